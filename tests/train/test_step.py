"""Tests of rlhf_jax/train/step.py: accumulation equals the whole batch (also with unequal token
counts per micro-batch), non-finite updates are skipped bitwise, sharding over 8 devices changes
nothing, the step compiles once, and a real toy transformer with ``sft_loss`` trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.parallel import data_parallel_mesh
from rlhf_jax.train import (
    OptimizerConfig,
    accumulate,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
)
from tests.helpers import assert_all_finite
from tests.train.common import (
    assert_trees_bitwise,
    host,
    toy_batch,
    toy_loss,
    toy_params,
)

LR = 0.1
# Rows with very different valid-token counts: the micro-batches of k=2 hold 11 and 6 tokens,
# those of k=4 hold 10, 1, 3, 3 (rows 2 and 5 are empty).
COUNTS = [5, 5, 0, 1, 3, 0, 2, 1]


@pytest.fixture(scope="module")
def sgd_steps():
    opt = optax.sgd(LR)
    return opt, {k: make_train_step(toy_loss, opt, micro_batches=k) for k in (1, 2, 4)}


def _state(opt, seed=0):
    return create_train_state(toy_params(seed), opt, seed=seed)


def _np_loss(params, batch):
    p = host(params)
    pred = np.tanh(batch["x"].astype(np.float64) @ p["w"] + p["b"]) @ p["v"]
    err = (pred - batch["y"]) ** 2 * batch["m"]
    return err.sum() / batch["m"].sum(), err, batch["m"].sum()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_micro_batches_equal_whole_batch_sgd(sgd_steps, k):
    opt, steps = sgd_steps
    batch = toy_batch(1, counts=COUNTS)
    p0 = host(toy_params())
    # independent reference: one SGD step on the whole batch's token mean
    grad = jax.grad(lambda p: toy_loss(p, batch, None)[0] / toy_loss(p, batch, None)[1])(
        toy_params())
    expected = jax.tree.map(lambda p, g: p - LR * np.asarray(g), p0, host(grad))
    new, metrics = steps[k](_state(opt), batch)
    for name in p0:
        np.testing.assert_allclose(np.asarray(new.params[name]), expected[name], atol=1e-6,
                                   rtol=0, err_msg=name)
    loss, err, count = _np_loss(p0, batch)
    assert float(metrics["count"]) == count == 17.0
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mse"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["max_err"]), err[batch["m"] > 0].max(), rtol=1e-5)
    gnorm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grad)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), gnorm, rtol=1e-5)
    assert float(metrics["update_skipped"]) == 0.0
    assert int(new.step) == 1 and int(new.skipped) == 0


def test_per_micro_batch_means_would_differ():
    """Sensitivity: averaging per-micro-batch means (``optax.MultiSteps``) is measurably wrong on
    this batch, so the equality above is a real check of dividing once."""
    batch = toy_batch(1, counts=COUNTS)
    params = toy_params()

    def mean_grad(b):
        return jax.grad(lambda p: toy_loss(p, b, None)[0] / toy_loss(p, b, None)[1])(params)

    halves = [jax.tree.map(lambda x: x[i * 4:(i + 1) * 4], batch) for i in range(2)]
    naive = jax.tree.map(lambda a, b: (a + b) / 2, mean_grad(halves[0]), mean_grad(halves[1]))
    whole = mean_grad(batch)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(naive),
                                                              jax.tree.leaves(whole)))
    assert diff > 1e-2


def test_accumulate_sums_hand():
    """``accumulate`` returns sums (not means): loss sum and count add over micro-batches."""
    batch = toy_batch(2, counts=COUNTS)
    params = toy_params()
    g1, t1, c1, m1 = accumulate(toy_loss, params, batch, jax.random.PRNGKey(0), 1)
    g4, t4, c4, m4 = accumulate(toy_loss, params, batch, jax.random.PRNGKey(0), 4)
    assert float(c1) == float(c4) == 17.0
    np.testing.assert_allclose(float(t4), float(t1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(m4["mse"].count) == 17.0
    assert float(m4["max_err"].value) == float(m1["max_err"].value)


def test_micro_batches_adamw_equal():
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant",
                                         weight_decay=0.1, max_grad_norm=0.5), 1000)
    batch = toy_batch(3, counts=COUNTS)
    outs = []
    for k in (1, 4):
        step = make_train_step(toy_loss, opt, micro_batches=k)
        s = _state(opt)
        for _ in range(2):
            s, m = step(s, batch)
        outs.append((host(s), host(m)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 outs[0][0].params, outs[1][0].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 outs[0][0].opt_state, outs[1][0].opt_state)
    assert outs[0][1]["count"] == outs[1][1]["count"] == 17.0


def test_indivisible_batch_and_bad_micro_batches_raise(sgd_steps):
    opt, steps = sgd_steps
    with pytest.raises(ValueError, match="not divisible by micro_batches=4"):
        steps[4](_state(opt), toy_batch(0, b=6))
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        make_train_step(toy_loss, opt, micro_batches=0)


def test_non_finite_skips_bitwise_and_counts():
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"), 1000)
    step = make_train_step(toy_loss, opt, micro_batches=2)
    good = toy_batch(4, counts=COUNTS)
    bad = toy_batch(5, counts=COUNTS)
    bad["y"][6, 0] = np.nan  # row 6 has 2 valid tokens: the loss of micro-batch 2 is NaN
    s, m = step(_state(opt), good)
    assert float(m["update_skipped"]) == 0.0 and int(s.skipped) == 0
    before = host(s)
    for i, expected_skipped in enumerate([1, 2]):
        s, m = step(s, bad)
        assert int(s.step) == 2 + i
        assert int(s.skipped) == expected_skipped
        assert float(m["update_skipped"]) == 1.0
        assert np.isnan(float(m["loss"]))
        assert_trees_bitwise(s.params, before.params)
        assert_trees_bitwise(s.opt_state, before.opt_state)
        assert_trees_bitwise(s.rng, before.rng)
    s, m = step(s, good)
    assert int(s.skipped) == 0 and int(s.step) == 4 and float(m["update_skipped"]) == 0.0
    assert not np.array_equal(np.asarray(s.params["w"]), before.params["w"])
    assert_all_finite(s.params)


def test_infinite_loss_with_finite_grad_is_skipped():
    def inf_loss(params, batch, key):
        total, count, metrics = toy_loss(params, batch, key)
        return total + jnp.inf, count, metrics  # gradient unaffected, loss infinite

    opt = optax.adamw(LR, weight_decay=0.1)  # a zeroed update would still move params/count
    step = make_train_step(inf_loss, opt)
    s0 = _state(opt)
    expected = host(s0)
    s, m = step(s0, toy_batch(6, counts=COUNTS))
    assert float(m["update_skipped"]) == 1.0 and int(s.skipped) == 1 and int(s.step) == 1
    assert np.isfinite(float(m["grad_norm"]))
    assert_trees_bitwise(s.params, expected.params)
    assert_trees_bitwise(s.opt_state, expected.opt_state)


@pytest.mark.parametrize("k, b", [(1, 8), (2, 16)])
def test_mesh_equals_single_device(k, b):
    assert jax.device_count() == 8
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="cosine"), 10)
    counts = (COUNTS * 2)[:b]
    single = make_train_step(toy_loss, opt, micro_batches=k)
    sharded = make_train_step(toy_loss, opt, micro_batches=k, mesh=data_parallel_mesh())
    sa, sb = _state(opt), _state(opt)
    for i in range(3):
        batch = toy_batch(10 + i, b=b, counts=counts)
        sa, ma = single(sa, batch)
        sb, mb = sharded(sb, batch)
        for key in ("loss", "count", "grad_norm", "mse", "max_err"):
            np.testing.assert_allclose(float(mb[key]), float(ma[key]), rtol=1e-6, err_msg=key)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0),
                 host(sa), host(sb))
    assert len(sb.params["w"].sharding.device_set) == 8  # replicated over the mesh


def test_learning_rate_metric_equals_schedule():
    cfg = OptimizerConfig(learning_rate=0.2, schedule="linear", warmup_steps=2, min_lr_ratio=0.5)
    opt, sched = make_optimizer(cfg, 6), make_schedule(cfg, 6)
    step = make_train_step(toy_loss, opt, learning_rate=sched)
    s = _state(opt)
    seen = []
    for i in range(6):
        s, m = step(s, toy_batch(20 + i, counts=COUNTS))
        seen.append(float(m["learning_rate"]))
    np.testing.assert_allclose(seen, [0.0, 0.1, 0.2, 0.175, 0.15, 0.125], rtol=1e-6)
    assert "learning_rate" not in make_train_step(toy_loss, opt)(_state(opt), toy_batch(0))[1]


def test_compiles_once_and_reuses_donated_state():
    traces = []

    def counting_loss(params, batch, key):
        traces.append(1)  # Python side effect: runs only while tracing
        return toy_loss(params, batch, key)

    opt = optax.adam(1e-2)
    step = make_train_step(counting_loss, opt, micro_batches=2)
    s = _state(opt)
    s, _ = step(s, toy_batch(30, counts=COUNTS))
    n_first = len(traces)
    assert n_first >= 1
    for i in range(4):  # same shapes: no retrace; the donated state is never handed back in
        s, m = step(s, toy_batch(31 + i, counts=COUNTS))
    assert len(traces) == n_first
    assert int(s.step) == 5
    step(s, toy_batch(0, b=4))  # a new shape traces again
    assert len(traces) > n_first


def test_eval_step_returns_sums():
    ev = make_eval_step(toy_loss)
    batch = toy_batch(40, counts=COUNTS)
    total, count, metrics = ev(toy_params(), batch, jax.random.PRNGKey(0))
    loss, _, n = _np_loss(toy_params(), batch)
    assert float(count) == n
    np.testing.assert_allclose(float(total) / float(count), loss, rtol=1e-5)
    total8, count8, _ = make_eval_step(toy_loss, mesh=data_parallel_mesh())(
        toy_params(), batch, jax.random.PRNGKey(0))
    assert float(count8) == n
    np.testing.assert_allclose(float(total8), float(total), rtol=1e-6)


def test_step_key_folds_step_into_loss():
    """The key the loss receives is ``fold_in(fold_in(PRNGKey(seed), step), micro_batch)``."""
    seen = []

    def key_loss(params, batch, key):
        total, count, metrics = toy_loss(params, batch, key)
        halves = jnp.stack([key & 0xFFFF, key >> 16]).astype(jnp.float32)  # exact in float32
        return total, count, metrics | {"key": _KeyStat(halves)}

    opt = optax.sgd(0.0)
    step = make_train_step(key_loss, opt)
    s = _state(opt, seed=7)
    for _ in range(2):
        s, m = step(s, toy_batch(50))
        seen.append(np.asarray(m["key"]).astype(np.uint32))
    for t, halves in enumerate(seen):
        want = np.asarray(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), t), 0))
        np.testing.assert_array_equal(halves[0] | (halves[1] << 16), want)
    assert not np.array_equal(seen[0], seen[1])


class _KeyStat(tuple):
    """A tiny ``Stat`` passing a value through (for test_step_key_folds_step_into_loss)."""

    def __new__(cls, v):
        return super().__new__(cls, (v,))

    def merge(self, other):
        return self

    def compute(self):
        return self[0]


jax.tree_util.register_pytree_node(_KeyStat, lambda s: ((s[0],), None),
                                   lambda _, c: _KeyStat(c[0]))


# --- the real toy transformer with sft_loss -------------------------------------------------

def _toy_transformer():
    from rlhf_jax.models import get_preset, init_model

    cfg = get_preset("toy-1m", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=1)
    return init_model(cfg, jax.random.PRNGKey(0))


def _token_batch(seed, b=4, t=8):
    from rlhf_jax.types import TokenBatch

    r = np.random.default_rng(seed)
    lens = np.array([8, 3, 6, 2])[:b]  # unequal: micro-batches of k=2 hold 7+5 vs 4+1 targets
    pos = np.arange(t)[None, :]
    attn = pos < lens[:, None]
    loss_mask = attn & (pos >= 1)
    return TokenBatch(tokens=r.integers(0, 64, size=(b, t)).astype(np.int32),
                      loss_mask=loss_mask, attention_mask=attn,
                      segment_ids=attn.astype(np.int32),
                      positions=np.broadcast_to(pos, (b, t)).astype(np.int32))


def test_toy_transformer_sft_micro_batches_equal_and_trains():
    from rlhf_jax.losses import sft_loss
    from rlhf_jax.models import token_batch_logprobs

    model, params = _toy_transformer()

    def loss_fn(p, batch, key):
        del key
        return sft_loss(token_batch_logprobs(model, p, batch), batch.loss_mask)

    batch = _token_batch(0)
    opt = optax.sgd(0.5)
    results = []
    for k in (1, 2):
        step = make_train_step(loss_fn, opt, micro_batches=k)
        s = create_train_state(jax.tree.map(jnp.array, params), opt, seed=0)
        losses = []
        for _ in range(3):
            s, m = step(s, batch)
            losses.append(float(m["loss"]))
            assert float(m["count"]) == 7 + 2 + 5 + 1
        results.append((host(s.params), losses, m))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
    losses, m = results[0][1], results[0][2]
    # first loss is the whole batch's token-mean NLL, computed independently of the step
    lp = np.asarray(token_batch_logprobs(model, params, batch))
    np.testing.assert_allclose(losses[0], -(lp * batch.loss_mask).sum() / 15.0, rtol=1e-5)
    assert losses[2] < losses[0]  # it learns
    assert_all_finite(results[0][0], "params")
    assert not np.array_equal(results[0][0]["embed"]["embedding"],
                              np.asarray(params["embed"]["embedding"]))


# ------------------------------------------------------------ minibatch_updates (PPO / GRPO)
def test_minibatch_updates_equals_explicit_epochs_of_sgd():
    """2 epochs x 2 minibatches in one scan == the same four SGD updates written out by hand:
    epoch e shuffles with permutation(fold_in(key, e)); each minibatch's gradient is its loss
    sum's gradient over its own token count; metrics merge exactly over all four."""
    from rlhf_jax.train import minibatch_updates

    opt = optax.sgd(0.1)
    batch, key = toy_batch(3, b=8), jax.random.PRNGKey(5)
    params, opt_state, bad, metrics = jax.jit(
        lambda p, s, b, k: minibatch_updates(toy_loss, opt, p, s, b, k, epochs=2,
                                             num_minibatches=2))(
        toy_params(), opt.init(toy_params()), batch, key)
    ref, sq, n, losses = toy_params(), 0.0, 0.0, []
    for e in range(2):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), 8)).reshape(2, 4)
        for idx in perm:
            mb = {k: v[idx] for k, v in batch.items()}
            g = jax.grad(lambda p: toy_loss(p, mb, None)[0])(ref)
            t, c, _ = toy_loss(ref, mb, None)
            ref = jax.tree.map(lambda p, gg: p - 0.1 * gg / c, ref, g)
            sq, n = sq + float(t), n + float(c)
            losses.append(float(t) / float(c))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref)
    assert int(bad) == 0
    np.testing.assert_allclose(float(metrics["mse"]), sq / n, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)


def test_minibatch_updates_skips_non_finite_minibatches_and_counts_them():
    from rlhf_jax.train import minibatch_updates

    opt = optax.sgd(0.1)
    batch = toy_batch(4, b=8)
    batch["y"] = np.full_like(batch["y"], np.nan)  # every minibatch's loss is NaN
    p0 = toy_params()
    params, _, bad, _ = minibatch_updates(toy_loss, opt, toy_params(), opt.init(p0), batch,
                                          jax.random.PRNGKey(0), epochs=3, num_minibatches=2)
    assert int(bad) == 6  # 3 epochs x 2 minibatches, all skipped
    assert_trees_bitwise(params, p0)
    with pytest.raises(ValueError, match="not divisible by num_minibatches=3"):
        minibatch_updates(toy_loss, opt, p0, opt.init(p0), batch, jax.random.PRNGKey(0),
                          epochs=1, num_minibatches=3)


def test_merge_stacked_metrics_folds_each_accumulator_exactly():
    # Four minibatches' accumulators stacked on axis 0, as lax.scan returns them: Mean sums,
    # Max/Min reduce, ExplainedVariance folds its own merge (moments, not sums of squares), so
    # the result equals the accumulators of the whole data at a large offset.
    from rlhf_jax.ops import ExplainedVariance, Max, Mean, Min, compute_metrics
    from rlhf_jax.train.step import merge_stacked_metrics

    r = np.random.default_rng(0)
    y = (1000 + r.normal(size=(4, 16))).astype(np.float32)
    yhat = (y + 0.5 * r.normal(size=(4, 16))).astype(np.float32)
    m = r.random((4, 16)) > 0.2
    stacked = jax.vmap(lambda a, b, c: {
        "ev": ExplainedVariance.of(a, b, c), "mean": Mean(jnp.sum(a * c), jnp.sum(c)),
        "max": Max(jnp.max(jnp.where(c, a, -jnp.inf))),
        "min": Min(jnp.min(jnp.where(c, a, jnp.inf)))})(y, yhat, m)
    got = compute_metrics(merge_stacked_metrics(stacked))
    y64, e64 = y[m].astype(np.float64), (y - yhat)[m].astype(np.float64)
    np.testing.assert_allclose(float(got["ev"]), 1 - e64.var() / y64.var(), rtol=1e-5)
    np.testing.assert_allclose(float(got["mean"]), y64.mean(), rtol=1e-6)
    assert float(got["max"]) == y[m].max() and float(got["min"]) == y[m].min()
