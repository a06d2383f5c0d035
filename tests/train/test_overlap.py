"""One-step-off rollouts (``train.overlap``, ``OnPolicyEngine(max_staleness=1)``).

The schedule (the rollout started at step ``t`` is the sampler's output with ``theta_t`` and the
key of step ``t + 1``; update ``t`` trains on the rollout of step ``t - 1``), the truncated
importance weights by hand and inside the update's gradient, the disjoint rollout sub-mesh
against one mesh, and exact resume through the trainer loop with a crash. The tiny model,
prompts and recording SGD are ``test_onpolicy``'s; the loss here is the same REINFORCE-style
``-sum_t A_t exp(logp - old_logp) / tokens`` but reads ``[B, T]`` advantages (the weights are
folded into them).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import BatchIterator
from rlhf_jax.models import score_completions
from rlhf_jax.ops import truncated_importance_weights
from rlhf_jax.parallel import MeshConfig, make_mesh
from rlhf_jax.sampling import make_sampler
from rlhf_jax.train import (Checkpointer, LoggingConfig, LoopConfig, Models, OnPolicyAlgorithm,
                            OnPolicyEngine, read_jsonl_metrics, train_loop)
from rlhf_jax.train.overlap import corrected_advantages
from rlhf_jax.types import PromptBatch
from tests.train.test_onpolicy import (FLAGS, LR, SAMPLING, V, _advantages, flat,
                                       recording_sgd, tiny)

N, P, POOL, G = 4, 4, 12, 2  # prompts per step, prompt width, prompts in all, samples each
SAMPLING_G = dataclasses.replace(SAMPLING, n=G)
CAP = 1.2  # low enough that LR=0.5 steps push some weights over it


def _loss(fwd, mb, _algo_state):
    adv = mb.advantages if mb.advantages.ndim == 2 else mb.advantages[:, None]
    ratio = jnp.exp(fwd.logprobs - mb.old_logp)  # [B, C]
    total = -jnp.sum(jnp.where(mb.mask, adv * ratio, 0.0))
    return total, jnp.sum(mb.mask, dtype=jnp.float32), {}


def algorithm(score_old: bool) -> OnPolicyAlgorithm:
    return OnPolicyAlgorithm(advantages=_advantages, loss=_loss, score_old=score_old)


def pool() -> tuple[PromptBatch, np.ndarray]:
    r = np.random.default_rng(1)
    mask = np.ones((POOL, P), bool)
    mask[::3, :1] = False  # some left padding
    tokens = (r.integers(2, V, (POOL, P)) * mask).astype(np.int32)
    return PromptBatch(tokens, mask), np.arange(POOL, dtype=np.int32)


def batches(k: int) -> list:
    data = BatchIterator(pool(), batch_size=N, seed=0)
    return [data.next() for _ in range(k)]


def engine(score_old: bool = False, *, staleness: int = 1, meshes=(None, None),
           cap: float = CAP) -> OnPolicyEngine:
    model, _ = tiny()
    return OnPolicyEngine(algorithm(score_old), Models(policy=model), sampling=SAMPLING_G,
                          optimizer=recording_sgd(LR), mesh=meshes[0], rollout_mesh=meshes[1],
                          max_staleness=staleness, is_cap=cap)


def start(eng: OnPolicyEngine):
    flags = {k: jnp.asarray(v) for k, v in FLAGS.items()}  # device arrays: checkpointable
    return eng.init({"policy": tiny()[1]}, {}, seed=0, algo_state=flags, prompt_shape=(N, P))


def run(eng: OnPolicyEngine, steps: int) -> list:
    """``[(host state, host metrics)]`` after each step of a one-step-off or on-policy run."""
    state, bs, out = start(eng), batches(steps + 1), []
    for t in range(steps):
        state, metrics = eng.step(state, bs[t], bs[t + 1])
        out.append((jax.device_get(state), jax.device_get(metrics)))
    return out


# --- the weights by hand ----------------------------------------------------------------------

def test_corrected_advantages_by_hand():
    """pi_prox = [0.5, 0.9, 0.2, 0.3], pi_behav = [0.25, 0.3, 0.4, 0.3], the last token
    masked, cap 2.5: weights 2, 2.5, 0.5, 0; the row's advantage -2 becomes -4, -5, -1, 0."""
    prox = jnp.log(jnp.array([[0.5, 0.9, 0.2, 0.3]]))
    behav = jnp.log(jnp.array([[0.25, 0.3, 0.4, 0.3]]))
    mask = jnp.array([[True, True, True, False]])
    adv, acc = corrected_advantages(jnp.array([-2.0]), prox, behav, mask, cap=2.5)
    np.testing.assert_allclose(adv, [[-4.0, -5.0, -1.0, 0.0]], rtol=1e-6)
    got = {k: float(v.compute()) for k, v in acc.items()}
    assert got == pytest.approx({
        "offpolicy/logprob_diff": (np.log(2) + np.log(3) + np.log(2)) / 3,
        "offpolicy/is_weight_mean": (2.0 + 2.5 + 0.5) / 3,
        "offpolicy/is_clipped_frac": 1 / 3}, rel=1e-6)


# --- the schedule -----------------------------------------------------------------------------

def _sample_by_hand(params, prompts, step: int):
    model, _ = tiny()
    key = jax.random.fold_in(jax.random.PRNGKey(0), step)
    return make_sampler(model, SAMPLING_G)(params["policy"], prompts.tokens, prompts.mask, key)


@pytest.mark.parametrize("score_old", [False, True])
def test_one_step_off_samples_ahead_and_trains_on_the_previous_rollout(score_old):
    """Step 0 samples batch 1 with theta_0; step 1 samples batch 2 with theta_1 and trains on
    batch 1's rollout (theta_0's): its recorded gradient is the decoupled objective's, computed
    here by hand from theta_1's log-probs and the behaviour log-probs."""
    eng, bs, model = engine(score_old), batches(3), tiny()[0]
    s0 = start(eng)
    theta0 = jax.device_get(s0.params)
    s1, _ = eng.step(s0, bs[0], bs[1])
    theta1, pend1 = jax.device_get(s1.params), jax.device_get(s1.pending)
    want1 = _sample_by_hand(theta0, bs[1][0], 1)
    np.testing.assert_array_equal(pend1.rollout.completion, want1.tokens)
    np.testing.assert_allclose(pend1.rollout.sampler_logp, want1.logprobs, atol=1e-6)
    np.testing.assert_array_equal(pend1.index, bs[1][1])

    s2, m2 = eng.step(s1, bs[1], bs[2])
    s2 = jax.device_get(s2)
    want2 = _sample_by_hand(theta1, bs[2][0], 2)
    np.testing.assert_array_equal(s2.pending.rollout.completion, want2.tokens)
    assert int(s2.step) == 2

    ro = pend1.rollout
    args = (ro.prompt, ro.prompt_mask, ro.completion, ro.mask)
    prox = score_completions(model, theta1["policy"], *args, temperature=1.0).logprobs
    w, _ = truncated_importance_weights(prox, ro.old_logp, ro.mask, cap=CAP)
    adv = jnp.where(jnp.arange(ro.mask.shape[0]) % 2 == 0, 1.0, -1.0)[:, None] * w  # [B, C]

    def objective(p):
        logp = score_completions(model, p, *args, temperature=1.0).logprobs
        return -jnp.sum(jnp.where(ro.mask, adv * logp, 0.0)) / jnp.sum(ro.mask)

    grad = flat(jax.grad(objective)(theta1["policy"]))
    got = flat(s2.opt_state["grads"]["policy"])
    assert max(np.abs(g).max() for g in grad.values()) > 1e-3
    for k in grad:
        np.testing.assert_allclose(got[k], grad[k], rtol=2e-4, atol=2e-6, err_msg=k)
    assert 0.0 < m2["offpolicy/is_clipped_frac"] < 1.0  # the cap was reached by some tokens
    assert m2["offpolicy/logprob_diff"] > 1e-3
    for k in ("offpolicy/logprob_diff", "offpolicy/is_weight_mean", "offpolicy/is_clipped_frac"):
        assert np.isfinite(m2[k])


def test_staleness_0_keeps_no_pending_rollout_and_ignores_the_next_batch():
    eng, bs = engine(staleness=0), batches(2)
    state = start(eng)
    assert state.pending == ()
    a, ma = eng.step(state, bs[0])
    b, mb = eng.step(start(eng), bs[0], bs[1])
    assert a.pending == () and "offpolicy/logprob_diff" not in ma
    for x, y in zip(jax.tree.leaves(jax.device_get((a, ma))),
                    jax.tree.leaves(jax.device_get((b, mb)))):
        np.testing.assert_array_equal(x, y)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="max_staleness must be 0"):
        engine(staleness=2)
    eng = engine()
    with pytest.raises(ValueError, match="needs init.*prompt_shape"):
        eng.init({"policy": tiny()[1]}, {}, seed=0, algo_state=FLAGS)
    bs = batches(3)
    with pytest.raises(ValueError, match="needs the next batch"):
        eng.step(start(eng), bs[0])
    state, _ = eng.step(start(eng), bs[0], bs[1])
    eng._produced = None  # as if restored: the pending rollout is checked against the batch
    with pytest.raises(ValueError, match="the data order differs"):
        eng.step(state, bs[2], bs[0])


# --- a rollout sub-mesh -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def meshes() -> dict:
    devs = jax.devices()
    assert len(devs) == 8, "tests/conftest.py sets 8 host devices"
    return {"single": (make_mesh(MeshConfig(), devs), None),
            "disjoint": (make_mesh(MeshConfig(), devs[:4]), make_mesh(MeshConfig(), devs[4:]))}


@pytest.mark.parametrize("staleness", [0, 1])
def test_disjoint_rollout_mesh_equals_one_mesh(staleness):
    got = {k: run(engine(staleness=staleness, meshes=m), 3) for k, m in meshes().items()}
    for (sa, ma), (sb, mb) in zip(got["single"], got["disjoint"]):
        if staleness:  # the same samples (same params, key and prompts)
            np.testing.assert_array_equal(sa.pending.rollout.completion,
                                          sb.pending.rollout.completion)
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, atol=1e-6, err_msg=k)
        pa, pb = flat(sa.params), flat(sb.params)
        for k in pa:
            np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6, err_msg=k)
    train_devices, rollout_devices = (set(m.devices.flat) for m in meshes()["disjoint"])
    eng = engine(meshes=meshes()["disjoint"])
    state = start(eng)
    ro, _, _ = eng.sample(state, state.step, batches(1)[0][0])
    assert ro.completion.sharding.device_set == rollout_devices  # sampled there
    for x in jax.tree.leaves((state.params, state.pending)):  # trained and checkpointed here
        assert x.sharding.device_set == train_devices


# --- exact resume through the loop ------------------------------------------------------------

STEPS, SAVE_EVERY, CRASH_AT = 5, 2, 3  # 3 batches per epoch: the resume crosses an epoch
QUIET = LoggingConfig(progress=False, tensorboard=False, console=False)


class _Crash(Exception):
    pass


def _loop(eng, run_dir: str, crash_at: int | None = None):
    def step(state, batch, next_batch):
        if crash_at is not None and int(state.step) == crash_at:
            raise _Crash
        return eng.step(state, batch, next_batch)

    cfg = LoopConfig(total_steps=STEPS, log_every=1, save_every=SAVE_EVERY, eval_at_start=False)
    return train_loop(cfg, run_dir=run_dir, state=start(eng), step_fn=step, logging=QUIET,
                      data=BatchIterator(pool(), batch_size=N, seed=0), lookahead=True)


def test_one_step_off_resume_is_exact(tmp_path):
    eng = engine()
    straight, _ = _loop(eng, str(tmp_path / "straight"))
    crashed = str(tmp_path / "crashed")
    with pytest.raises(_Crash):
        _loop(eng, crashed, crash_at=CRASH_AT)
    ck = Checkpointer(os.path.join(crashed, "checkpoints"))
    assert ck.all_steps() == [2]
    ck.close()
    final, _ = _loop(eng, crashed)
    a, b = flat(jax.device_get(straight)), flat(jax.device_get(final))
    assert a.keys() == b.keys() and any(".pending" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    def rows(d):
        return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
                for r in read_jsonl_metrics(os.path.join(d, "metrics.jsonl"))]

    def ledger(d):
        with open(os.path.join(d, "ledger.tsv"), encoding="utf-8") as f:
            return f.read().splitlines()

    assert ledger(crashed) == ledger(str(tmp_path / "straight")) and len(ledger(crashed)) == STEPS
    assert rows(crashed) == rows(str(tmp_path / "straight"))
    assert [r["step"] for r in rows(crashed)] == list(range(1, STEPS + 1))
