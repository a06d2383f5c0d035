"""Tests of the PPO losses (rlhf_jax/losses/ppo.py): clipped_surrogate, ppo_policy_loss,
value_loss, entropy_bonus. Hand cases, NumPy loops, hypothesis properties and gradients.

Per token, ``r = exp(logp - old_logp)`` and ``l = max(-A r, -A clip(r, 1 - lo, 1 + hi))``;
with dual clip ``c`` and ``A < 0``, ``l = min(l, -c A)``. Handy: ln 2 = 0.693147,
ln 1.1 = 0.0953102, k3(lr) = expm1(lr) - lr: k3(ln 2) = 0.306853, k3(ln .5) = 0.193147.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses import clipped_surrogate, entropy_bonus, ppo_policy_loss, value_loss
from rlhf_jax.ops.aggregation import AGGREGATIONS
from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from tests.helpers import (
    EXTREME_LOG_RATIOS,
    assert_all_finite,
    assert_trees_close,
    check_grads,
    float_array_strategy,
    mask_strategy,
    random_mask,
    rng,
)

B, T = 4, 5  # fixed shapes of the property tests
MODES = sorted(AGGREGATIONS)
NAN, INF = float("nan"), float("inf")
LN2 = math.log(2.0)


def _allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _m(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in compute_metrics(metrics).items()}


@functools.lru_cache(maxsize=None)
def _jit(fn, **kw):
    """``fn`` jitted with its keyword hyperparameters fixed (one compile per configuration)."""
    return jax.jit(functools.partial(fn, **kw))


def _jit_kw(fn, kw):
    return _jit(fn, **kw)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(fn, **kw):
    """Jitted ``(out, (d sum / d logp, d sum / d old_logp))`` of a policy loss."""
    def run(logp, old, adv, mask):
        f = lambda a, b: fn(a, b, adv, mask, **kw)  # noqa: E731
        (_, out), grads = jax.value_and_grad(lambda a, b: (f(a, b)[0], f(a, b)), argnums=(0, 1),
                                             has_aux=True)(logp, old)
        return out, grads
    return jax.jit(run)


def _check_split(fn, arrays, mask, k, kw, atol=1e-4):
    """Micro-batched equals whole: sums and counts of rows [:k] and [k:] add to the whole's."""
    whole = _jit_kw(fn, kw)(*arrays, mask)
    a = fn(*[x[:k] for x in arrays], mask[:k], **kw)
    b = fn(*[x[k:] for x in arrays], mask[k:], **kw)
    _allclose(a[0] + b[0], whole[0], atol=atol)
    assert float(a[1] + b[1]) == float(whole[1])
    assert_trees_close(compute_metrics(merge_metrics(a[2], b[2])), compute_metrics(whole[2]),
                       rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------------- NumPy references
def np_surrogate(logp, old, adv, mask, lo, hi, dual=None, clamp=20.0):
    """Float64 loops: per-token loss and the metric means of ``clipped_surrogate``."""
    b, t = logp.shape
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (b, t))
    loss = np.zeros((b, t))
    s = {"clip_frac": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0, "approx_kl": 0.0,
         "ratio_mean": 0.0, "dual_clip_frac": 0.0}
    n, rmax, rmin = 0, -INF, INF
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            lr = min(max(float(logp[i, j]) - float(old[i, j]), -clamp), clamp)
            r, a = math.exp(lr), float(adv[i, j])
            l_tok = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if dual is not None and a < 0 and l_tok > -dual * a:
                l_tok = -dual * a
                s["dual_clip_frac"] += 1
            loss[i, j] = l_tok
            low, high = (r < 1 - lo and a < 0), (r > 1 + hi and a > 0)
            s["clip_frac_low"] += low
            s["clip_frac_high"] += high
            s["clip_frac"] += low or high
            s["approx_kl"] += math.expm1(lr) - lr
            s["ratio_mean"] += r
            rmax, rmin = max(rmax, r), min(rmin, r)
            n += 1
    s = {k: v / n if n else 0.0 for k, v in s.items()}
    s["ratio_max"], s["ratio_min"] = (rmax, rmin) if n else (0.0, 0.0)  # empty: 0, like a mean
    if dual is None:
        del s["dual_clip_frac"]
    return loss, s


def np_aggregate(loss, mask, mode, max_tokens=None):
    b, t = loss.shape
    norm = float(t if max_tokens is None else max_tokens)
    total, count = 0.0, 0.0
    for i in range(b):
        row = sum(float(loss[i, j]) for j in range(t) if mask[i, j])
        n = sum(1 for j in range(t) if mask[i, j])
        if mode == "token_mean":
            total, count = total + row, count + n
        elif n:
            count += 1
            total += {"seq_mean_token_mean": row / n, "seq_mean_token_sum": row,
                      "seq_mean_token_sum_norm": row / norm}[mode]
    return total, count


def _random_policy_inputs(r, b, t, lr_scale=0.5, adv_dim=2):
    old = -r.exponential(1.0, (b, t)).astype(np.float32)
    logp = (old + r.normal(0, lr_scale, (b, t))).astype(np.float32)
    adv = r.normal(0, 1, (b, t) if adv_dim == 2 else (b,)).astype(np.float32)
    return logp, old, adv


# ------------------------------------------------------------------------------------ hand cases
# eps_low 0.2, eps_high 0.3; tokens (A, r): (1, 2) (-1, .5) (1, .5) (-1, 2) (2, 1.1) + 1 masked.
H_LR = np.array([[LN2, -LN2, -LN2, LN2, math.log(1.1), 7.0]], np.float32)
H_OLD = np.array([[-1.0, -2.0, -0.5, -3.0, -1.5, -1.0]], np.float32)
H_LOGP = (H_OLD + H_LR).astype(np.float32)
H_ADV = np.array([[1.0, -1.0, 1.0, -1.0, 2.0, 5.0]], np.float32)
H_MASK = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
# per-token loss:
#  (1, 2):   max(-2, -1.3)   = -1.3  clipped high, gradient 0
#  (-1, .5): max(.5, .8)     = 0.8   clipped low, gradient 0
#  (1, .5):  max(-.5, -.8)   = -0.5  unclipped, d/dlogp (-A r) = -0.5
#  (-1, 2):  max(2, 1.3)     = 2.0   unclipped (pessimistic), gradient 2
#  (2, 1.1): max(-2.2, -2.2) = -2.2  inside the range, gradient -2.2
H_LOSS = [[-1.3, 0.8, -0.5, 2.0, -2.2, 0.0]]
H_GRAD = [[0.0, 0.0, -0.5, 2.0, -2.2, 0.0]]


def test_clipped_surrogate_hand_each_branch():
    loss, metrics = clipped_surrogate(H_LOGP, H_OLD, H_ADV, H_MASK, clip_eps_low=0.2,
                                      clip_eps_high=0.3)
    _allclose(loss, H_LOSS)
    g = jax.grad(lambda x: clipped_surrogate(x, H_OLD, H_ADV, H_MASK, clip_eps_low=0.2,
                                             clip_eps_high=0.3)[0].sum())(H_LOGP)
    _allclose(g, H_GRAD)
    m = _m(metrics)
    _allclose(m["clip_frac_low"], 1 / 5)
    _allclose(m["clip_frac_high"], 1 / 5)
    _allclose(m["clip_frac"], 2 / 5)
    # k3: 2 * 0.306853 + 2 * 0.193147 + (0.1 - 0.0953102) = 1.0046898; / 5
    _allclose(m["approx_kl"], 1.0046898 / 5)
    _allclose(m["ratio_mean"], (2 + 0.5 + 0.5 + 2 + 1.1) / 5)  # 1.22
    _allclose(m["ratio_max"], 2.0)
    _allclose(m["ratio_min"], 0.5)  # the masked token (ratio e^7) does not count
    assert "dual_clip_frac" not in m


def test_clipped_surrogate_hand_dual_clip():
    # eps 0.2, c = 3; tokens (A, r): (-1, 5) (-1, 2) (1, 5)
    lr = np.array([[math.log(5.0), LN2, math.log(5.0)]], np.float32)
    adv = np.array([[-1.0, -1.0, 1.0]], np.float32)
    old = np.zeros((1, 3), np.float32)
    f = lambda x: clipped_surrogate(x, old, adv, None, clip_eps_low=0.2,  # noqa: E731
                                    dual_clip=3.0)
    loss, metrics = f(lr)
    # (-1, 5): max(5, 1.2) = 5 > -cA = 3 -> capped at 3, gradient 0
    # (-1, 2): max(2, 1.2) = 2 <= 3 -> 2, gradient -A r = 2
    # (1, 5):  max(-5, -1.2) = -1.2 (dual clip is for A < 0 only), gradient 0
    _allclose(loss, [[3.0, 2.0, -1.2]])
    _allclose(jax.grad(lambda x: f(x)[0].sum())(lr), [[0.0, 2.0, 0.0]])
    m = _m(metrics)
    _allclose(m["dual_clip_frac"], 1 / 3)
    _allclose(m["clip_frac_high"], 1 / 3)
    _allclose(m["clip_frac_low"], 0.0)


def test_clipped_surrogate_hand_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="clip epsilons"):
        clipped_surrogate(H_LOGP, H_OLD, H_ADV, H_MASK, clip_eps_low=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(H_LOGP, H_OLD, H_ADV, H_MASK, clip_eps_low=0.2, dual_clip=1.0)


def test_ppo_policy_loss_hand():
    out = ppo_policy_loss(H_LOGP, H_OLD, H_ADV, H_MASK, clip_eps_low=0.2, clip_eps_high=0.3)
    _allclose(out[0], -1.3 + 0.8 - 0.5 + 2.0 - 2.2)  # = -1.2 over 5 tokens
    assert float(out[1]) == 5.0
    _allclose(_m(out[2])["clip_frac"], 0.4)
    # symmetric default eps 0.2: token (1, 2) now clips at -1.2 and (-1, 2) is still 2.0
    out = ppo_policy_loss(H_LOGP, H_OLD, H_ADV, H_MASK)
    _allclose(out[0], -1.2 + 0.8 - 0.5 + 2.0 - 2.2)
    # seq_mean_token_sum_norm with max_tokens 4: -1.2 / 4 = -0.3, one sequence
    out = ppo_policy_loss(H_LOGP, H_OLD, H_ADV, H_MASK, clip_eps_low=0.2, clip_eps_high=0.3,
                          aggregation="seq_mean_token_sum_norm", max_tokens=4)
    _allclose(out[0], -0.3)
    assert float(out[1]) == 1.0


def test_ppo_policy_loss_hand_dual_clip_and_seq_advantages():
    # [B] advantages (-1,) broadcast; tokens r = 5, 2: losses 3 (capped), 2 -> mean 2.5 per seq
    lr = np.array([[math.log(5.0), LN2]], np.float32)
    out = ppo_policy_loss(lr, np.zeros((1, 2), np.float32), np.array([-1.0], np.float32), None,
                          dual_clip=3.0, aggregation="seq_mean_token_mean")
    _allclose(out[0], 2.5)
    assert float(out[1]) == 1.0


# ----------------------------------------------------------------------------------------- numpy
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("hi,dual", [(None, None), (0.28, None), (0.28, 2.5)])
def test_clipped_surrogate_numpy(seed, hi, dual):
    r = rng(seed)
    logp, old, adv = _random_policy_inputs(r, 5, 7, lr_scale=0.6)
    mask = random_mask(r, 5, 7, empty_rows=1, single_rows=1)
    loss, metrics = clipped_surrogate(logp, old, adv, mask, clip_eps_low=0.2,
                                      clip_eps_high=hi, dual_clip=dual)
    want, want_m = np_surrogate(logp, old, adv, mask, 0.2, 0.2 if hi is None else hi, dual)
    _allclose(loss, want)
    assert_trees_close(_m(metrics), want_m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("adv_dim", [1, 2])
def test_ppo_policy_loss_numpy(mode, adv_dim):
    r = rng(7 + adv_dim)
    logp, old, adv = _random_policy_inputs(r, 6, 5, lr_scale=0.6, adv_dim=adv_dim)
    mask = random_mask(r, 6, 5, empty_rows=1, single_rows=1)
    out = ppo_policy_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28,
                          dual_clip=3.0, aggregation=mode, max_tokens=9)
    per_tok, metrics = np_surrogate(logp, old, adv, mask, 0.2, 0.28, 3.0)
    total, count = np_aggregate(per_tok, mask, mode, max_tokens=9)
    _allclose(out[0], total)
    assert float(out[1]) == count
    got = _m(out[2])
    for k, v in metrics.items():
        _allclose(got[k], v)


# -------------------------------------------------------------------------------------- property
lr_st = float_array_strategy((3, B, T), -2.0, 2.0)  # logp, old_logp, advantages


def _policy_arrays(x):
    old = np.minimum(x[1], 0.0) - 0.1
    return (old + x[0] / 2).astype(np.float32), old.astype(np.float32), x[2]


@given(x=lr_st, mask=mask_strategy(B, T))
def test_clipped_surrogate_property_pessimistic_bound_and_zero_advantage(x, mask):
    """Loss l >= -A r (pessimistic: never below the unclipped loss); A = 0 gives l = 0."""
    logp, old, adv = _policy_arrays(x)
    loss, metrics = _jit(clipped_surrogate, clip_eps_low=0.2, clip_eps_high=0.3)(
        logp, old, adv, mask)
    r = np.exp(np.clip(logp.astype(np.float64) - old, -20, 20))
    assert np.all(np.asarray(loss) >= np.where(mask > 0, -adv * r, 0.0) - 1e-5)
    assert np.all(np.asarray(loss)[mask == 0] == 0.0)
    m = _m(metrics)
    _allclose(m["clip_frac"], m["clip_frac_low"] + m["clip_frac_high"])  # disjoint events
    zero, _ = clipped_surrogate(logp, old, np.zeros_like(adv), mask, clip_eps_low=0.2)
    assert np.all(np.asarray(zero) == 0.0)


@given(x=lr_st, mask=mask_strategy(B, T), junk=st.sampled_from([NAN, INF, -INF, 1e30]))
def test_clipped_surrogate_property_mask_equals_slice(x, mask, junk):
    """Masked tokens may hold anything: per-token losses of valid tokens are unchanged."""
    logp, old, adv = _policy_arrays(x)
    dirty = [np.where(mask > 0, v, junk).astype(np.float32) for v in (logp, old, adv)]
    f = _jit(clipped_surrogate, clip_eps_low=0.2, clip_eps_high=0.3, dual_clip=2.0)
    loss, metrics = f(*dirty, mask)
    ref, _ = f(logp, old, adv, np.ones_like(mask))
    _allclose(np.asarray(loss), np.where(mask > 0, ref, 0.0))
    _, want = np_surrogate(logp, old, adv, mask, 0.2, 0.3, 2.0)
    got = _m(metrics)
    for k, v in want.items():
        _allclose(got[k], v)


@given(x=lr_st, mask=mask_strategy(B, T))
def test_ppo_policy_loss_property_ratio_one(x, mask):
    """logp == old_logp: per-token loss -A whatever the clip, gradient -A (token_mean sum)."""
    old, adv = _policy_arrays(x)[1:]
    f = _jit(ppo_policy_loss, clip_eps_low=0.1, clip_eps_high=0.3, dual_clip=2.0)
    out = f(old, old, adv, mask)
    _allclose(out[0], -(adv.astype(np.float64) * mask).sum(), atol=1e-4)
    g = jax.grad(lambda lp: ppo_policy_loss(lp, old, adv, mask, clip_eps_low=0.1)[0])(old)
    _allclose(g, -adv * mask)
    m = _m(out[2])
    assert m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0
    assert m["ratio_mean"] == (1.0 if mask.any() else 0.0)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10)
@given(x=lr_st, mask=mask_strategy(B, T), k=st.integers(0, B),
       dual=st.sampled_from([None, 3.0]), adv_dim=st.sampled_from([1, 2]))
def test_ppo_policy_loss_property_micro_batched_equals_whole(mode, x, mask, k, dual, adv_dim):
    logp, old, adv = _policy_arrays(x)
    if adv_dim == 1:
        adv = adv[:, 0]
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual, aggregation=mode,
              max_tokens=T)
    _check_split(ppo_policy_loss, (logp, old, adv), mask, k, kw)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10)
@given(x=lr_st, mask=mask_strategy(B, T - 2), junk=st.sampled_from([NAN, INF, -INF, 1e30]))
def test_ppo_policy_loss_property_mask_equals_slice(mode, x, mask, junk):
    """Junk in masked tokens and in padding columns: equal to the loss on the sliced batch."""
    logp, old, adv = _policy_arrays(x)
    full = np.concatenate([mask, np.zeros((B, 2), np.float32)], axis=1)
    dirty = [np.where(full > 0, v, junk).astype(np.float32) for v in (logp, old, adv)]
    kw = dict(clip_eps_low=0.2, dual_clip=3.0, aggregation=mode, max_tokens=T)
    out = _jit_kw(ppo_policy_loss, kw)(*dirty, full)
    ref = _jit_kw(ppo_policy_loss, kw)(*[v[:, :T - 2] for v in (logp, old, adv)], mask)
    _allclose(out[0], ref[0])
    assert float(out[1]) == float(ref[1])
    assert_trees_close(_m(out[2]), _m(ref[2]), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda a, b: ppo_policy_loss(a, b, dirty[2], full, **kw)[0],
                 argnums=(0, 1))(dirty[0], dirty[1])
    assert_all_finite(g, "gradient")
    assert all(np.all(np.asarray(v)[full == 0] == 0.0) for v in g)


@pytest.mark.parametrize("v", EXTREME_LOG_RATIOS)
@pytest.mark.parametrize("side", ["logp", "old_logp"])
def test_ppo_policy_loss_property_extreme_log_ratios(v, side):
    """log-ratios of +-50, +-100, +-inf (in logp or in old_logp): finite loss and gradients."""
    base = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]], np.float32)
    logp, old = base.copy(), base.copy()
    if side == "logp":
        logp[:, 0] = old[:, 0] + v
    else:
        old[:, 0] = logp[:, 0] - v
    adv = np.array([[1.0, -1.0, 0.5], [-1.0, 2.0, 1.0]], np.float32)
    mask = np.ones((2, 3), np.float32)
    for mode in MODES:
        for dual in (None, 3.0):
            out, grads = _loss_and_grads(ppo_policy_loss, clip_eps_high=0.28, dual_clip=dual,
                                         aggregation=mode)(logp, old, adv, mask)
            assert_all_finite(out[:2], "loss")
            assert_all_finite(grads, "gradient")
            m = _m(out[2])
            assert_all_finite(m, "metrics")
            # the clamp (20) bounds the ratio and the k3 of the extreme token
            assert m["ratio_max"] <= math.exp(20.0) * (1 + 1e-6)
            assert m["ratio_min"] >= math.exp(-20.0) * (1 - 1e-6)


def test_ppo_policy_loss_property_empty_and_single_mask():
    logp, old, adv = _random_policy_inputs(rng(3), 3, 4)
    for mode in MODES:
        f = lambda a, m: ppo_policy_loss(a, old, adv, m, aggregation=mode, dual_clip=2.0)  # noqa
        empty = np.zeros((3, 4), np.float32)
        out = f(logp, empty)
        assert float(out[0]) == 0.0 and float(out[1]) == 0.0
        g = jax.grad(lambda a: f(a, empty)[0])(logp)
        assert np.all(np.asarray(g) == 0.0)
        m = _m(out[2])
        assert all(m[k] == 0.0 for k in ("clip_frac", "approx_kl", "ratio_mean"))
        single = np.zeros((3, 4), np.float32)
        single[2, 1] = 1
        out = f(logp, single)
        assert float(out[1]) == 1.0
        assert_all_finite((out[:2], jax.grad(lambda a: f(a, single)[0])(logp)), "single")


def test_ppo_policy_loss_property_seq_advantages_equal_broadcast():
    logp, old, adv = _random_policy_inputs(rng(4), 4, 6, adv_dim=1)
    mask = random_mask(rng(5), 4, 6)
    for mode in MODES:
        a = ppo_policy_loss(logp, old, adv, mask, aggregation=mode)
        b = ppo_policy_loss(logp, old, np.repeat(adv[:, None], 6, 1), mask, aggregation=mode)
        _allclose(a[0], b[0], atol=1e-6)
        assert float(a[1]) == float(b[1])


# ------------------------------------------------------------------------------------------ grad
def _away_from_kinks(r, b, t, lo=0.2, hi=0.3, dual=3.0):
    """Random inputs whose ratios are >= 0.03 from 1 - lo, 1 + hi and the dual-clip point."""
    while True:
        logp, old, adv = _random_policy_inputs(r, b, t, lr_scale=0.6)
        ratio = np.exp(logp.astype(np.float64) - old)
        kinks = np.stack([np.abs(ratio - (1 - lo)), np.abs(ratio - (1 + hi)),
                          np.abs(ratio - dual)])
        if kinks.min() > 0.03 and np.abs(adv).min() > 0.05:
            return logp, old, adv


def test_clipped_surrogate_grad_check_grads():
    logp, old, adv = _away_from_kinks(rng(11), 2, 3)
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    f = lambda a, b: clipped_surrogate(a, b, adv, mask, clip_eps_low=0.2,  # noqa: E731
                                       clip_eps_high=0.3, dual_clip=3.0)[0].sum()
    check_grads(f, (jnp.asarray(logp), jnp.asarray(old)), order=1, modes=["rev"], eps=1e-3,
                atol=1e-2, rtol=1e-2)


def test_clipped_surrogate_grad_analytic():
    """d l / d logp = -A r where the unclipped branch is active, 0 where clipped or dual-capped."""
    r = rng(12)
    logp, old, adv = _random_policy_inputs(r, 4, 6, lr_scale=0.8)
    mask = random_mask(r, 4, 6)
    g = jax.grad(lambda a: clipped_surrogate(a, old, adv, mask, clip_eps_low=0.2,
                                             clip_eps_high=0.3, dual_clip=2.0)[0].sum())(logp)
    ratio = np.exp(logp.astype(np.float64) - old)
    clipped = ((ratio > 1.3) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    capped = (adv < 0) & (ratio > 2.0)
    want = np.where(mask > 0, np.where(clipped | capped, 0.0, -adv * ratio), 0.0)
    _allclose(g, want)


@pytest.mark.parametrize("mode", MODES)
def test_ppo_policy_loss_grad_check_grads(mode):
    logp, old, adv = _away_from_kinks(rng(13), 3, 4)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], np.float32)
    f = lambda a, b: ppo_policy_loss(a, b, adv, mask, clip_eps_high=0.3,  # noqa: E731
                                     dual_clip=3.0, aggregation=mode)[0]
    check_grads(f, (jnp.asarray(logp), jnp.asarray(old)), order=1, modes=["rev"], eps=1e-3,
                atol=1e-2, rtol=1e-2)


def test_ppo_policy_loss_grad_ratio_one_and_mean():
    """At ratio 1 the gradient of the token-mean loss (sum / count) is -A / count."""
    _, old, adv = _random_policy_inputs(rng(14), 3, 5)
    mask = random_mask(rng(15), 3, 5, single_rows=1)
    g = jax.grad(lambda a: (lambda o: o[0] / o[1])(ppo_policy_loss(a, old, adv, mask)))(old)
    _allclose(g, -adv * mask / mask.sum(), atol=1e-6)


# ------------------------------------------------------------------------------------ value_loss
# V = (1.5, .9, 0), V_old = (1, 0, 0), R = (0, 1, 1), eps 0.2:
#  t0: (V-R)^2 = 2.25; V_clip = 1 + .2 = 1.2, (1.2)^2 = 1.44  -> .5 * 2.25 = 1.125
#  t1: (.9-1)^2 = .01;  V_clip = 0 + .2 = .2, (.8)^2 = .64     -> .5 * .64 = .32 (clipped wins)
#  t2: 1, V_clip = 0, 1 (tie, not counted as clipped)         -> .5
V_H = np.array([[1.5, 0.9, 0.0, 7.0]], np.float32)
VOLD_H = np.array([[1.0, 0.0, 0.0, -7.0]], np.float32)
R_H = np.array([[0.0, 1.0, 1.0, 3.0]], np.float32)
M_H = np.array([[1, 1, 1, 0]], np.float32)


def test_value_loss_hand():
    out = value_loss(V_H, VOLD_H, R_H, M_H, clip_eps=0.2)
    _allclose(out[0], 1.125 + 0.32 + 0.5)  # 1.945
    assert float(out[1]) == 3.0
    m = _m(out[2])
    _allclose(m["value_clip_frac"], 2 / 3)  # |V - V_old| = 0.5, 0.9, 0.0: clip active on two
    _allclose(m["values"], 2.4 / 3)
    _allclose(m["returns"], 2 / 3)
    # R = (0, 1, 1), R - V_old = (-1, 1, 1): Var R = 2/3 - 4/9 = 2/9, Var e = 1 - 1/9 = 8/9
    # EV = 1 - (8/9) / (2/9) = -3
    _allclose(m["explained_variance"], -3.0)
    out = value_loss(V_H, VOLD_H, R_H, M_H, clip_eps=None)
    _allclose(out[0], 0.5 * (2.25 + 0.01 + 1.0))  # 1.63
    assert "value_clip_frac" not in out[2]


def test_value_loss_hand_gradient():
    g = jax.grad(lambda v: value_loss(v, VOLD_H, R_H, M_H, clip_eps=0.2)[0])(V_H)
    # t0: unclipped branch, V - R = 1.5; t1: clipped branch saturated, 0; t2: V - R = -1
    _allclose(g, [[1.5, 0.0, -1.0, 0.0]])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_numpy(mode, clip):
    r = rng(21)
    v_old = r.normal(0, 1, (5, 6)).astype(np.float32)
    v = (v_old + r.normal(0, 0.4, (5, 6))).astype(np.float32)
    ret = r.normal(0.5, 1.5, (5, 6)).astype(np.float32)
    mask = random_mask(r, 5, 6, empty_rows=1, single_rows=1)
    out = value_loss(v, v_old, ret, mask, clip_eps=clip, aggregation=mode, max_tokens=8)
    per = np.zeros((5, 6))
    n_clip = 0
    for i in range(5):
        for j in range(6):
            a = (float(v[i, j]) - float(ret[i, j])) ** 2
            if clip is None:
                per[i, j] = 0.5 * a
                continue
            vc = float(v_old[i, j]) + min(max(float(v[i, j]) - float(v_old[i, j]), -clip), clip)
            c = (vc - float(ret[i, j])) ** 2
            per[i, j] = 0.5 * max(a, c)
            n_clip += bool(mask[i, j]) and abs(float(v[i, j]) - float(v_old[i, j])) > clip
    total, count = np_aggregate(per, mask, mode, max_tokens=8)
    _allclose(out[0], total)
    assert float(out[1]) == count
    m = _m(out[2])
    keep = mask > 0
    rv, ov = ret[keep].astype(np.float64), v_old[keep].astype(np.float64)
    _allclose(m["explained_variance"], 1 - np.var(rv - ov) / np.var(rv))
    _allclose(m["values"], v[keep].astype(np.float64).mean())
    if clip is not None:
        _allclose(m["value_clip_frac"], n_clip / keep.sum())


vals_st = float_array_strategy((3, B, T), -3.0, 3.0)


@given(x=vals_st, mask=mask_strategy(B, T), k=st.integers(0, B),
       clip=st.sampled_from([None, 0.2]))
def test_value_loss_property_micro_batched_equals_whole(x, mask, k, clip):
    for mode in MODES:
        kw = dict(clip_eps=clip, aggregation=mode, max_tokens=T)
        _check_split(value_loss, tuple(x), mask, k, kw, atol=1e-3)


@given(x=vals_st, mask=mask_strategy(B, T), junk=st.sampled_from([NAN, INF, -INF]))
def test_value_loss_property_clipped_dominates_and_mask(x, mask, junk):
    """Clipped loss >= unclipped; equal when V == V_old; masked junk changes nothing."""
    v, v_old, ret = x
    f = _jit(value_loss, clip_eps=0.2)
    clipped = f(v, v_old, ret, mask)
    plain = _jit(value_loss, clip_eps=None)(v, v_old, ret, mask)
    assert float(clipped[0]) >= float(plain[0]) - 1e-4
    same = f(v, v, ret, mask)
    _allclose(same[0], 0.5 * ((v.astype(np.float64) - ret) ** 2 * mask).sum(), atol=1e-3)
    dirty = [np.where(mask > 0, a, junk).astype(np.float32) for a in x]
    out = f(*dirty, mask)
    _allclose(out[0], clipped[0])
    assert_trees_close(_m(out[2]), _m(clipped[2]), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda a: value_loss(a, *dirty[1:], mask, clip_eps=0.2)[0])(dirty[0])
    assert_all_finite(g, "gradient")


def test_value_loss_numpy_clip_frac_no_ulp_noise():
    # Issue 15 item 9.1: unclipped tokens (|V - V_old| <= eps) used to count as clipped when
    # V_old + (V - V_old) != V in float32 (~1% of a random batch). float64 reference: the
    # fraction with |V - V_old| > eps.
    r = rng(915)
    v_old = r.normal(0, 3, (64, 64)).astype(np.float32)
    v = (v_old + r.uniform(-0.3, 0.3, (64, 64))).astype(np.float32)
    ret = r.normal(0, 3, (64, 64)).astype(np.float32)
    mask = np.ones((64, 64), np.float32)
    m = _m(value_loss(v, v_old, ret, mask, clip_eps=0.2)[2])
    want = np.mean(np.abs(v.astype(np.float64) - v_old.astype(np.float64)) > 0.2)
    _allclose(m["value_clip_frac"], want, atol=1e-6)  # old code: off by ~1e-2


def test_value_loss_property_empty_mask():
    v = jnp.ones((2, 3))
    out = value_loss(v, v, v, jnp.zeros((2, 3)))
    assert float(out[0]) == 0.0 and float(out[1]) == 0.0
    assert all(val == 0.0 for val in _m(out[2]).values())
    g = jax.grad(lambda a: value_loss(a, v, v, jnp.zeros((2, 3)))[0])(v)
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_grad_check_grads(clip):
    r = rng(22)
    v_old = r.normal(0, 1, (2, 4)).astype(np.float32)
    d = r.choice([-1, 1], (2, 4)) * r.uniform(0.05, 0.15, (2, 4))  # away from the clip kink
    v = (v_old + d).astype(np.float32)
    ret = r.normal(0, 1, (2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], np.float32)
    f = lambda a: value_loss(a, v_old, ret, mask, clip_eps=clip)[0]  # noqa: E731
    check_grads(f, (jnp.asarray(v),), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # inside the clip range both branches agree: the gradient is (V - R) on valid tokens
    _allclose(jax.grad(f)(v), (v - ret) * mask, atol=1e-6)


# --------------------------------------------------------------------------------- entropy_bonus
def test_entropy_bonus_hand():
    ent = np.array([[1.0, 2.0, 3.0], [0.5, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    out = entropy_bonus(ent, mask, coef=0.01)
    _allclose(out[0], -0.01 * (1 + 2 + 0.5))  # -0.035 over 3 tokens
    assert float(out[1]) == 3.0
    _allclose(_m(out[2])["entropy"], 3.5 / 3)
    out = entropy_bonus(ent, mask, coef=0.01, aggregation="seq_mean_token_mean")
    _allclose(out[0], -0.01 * (1.5 + 0.5))  # per-row means 1.5 and 0.5
    assert float(out[1]) == 2.0


@pytest.mark.parametrize("mode", MODES)
def test_entropy_bonus_numpy(mode):
    r = rng(31)
    ent = r.uniform(0, 3, (5, 6)).astype(np.float32)
    mask = random_mask(r, 5, 6, empty_rows=1, single_rows=1)
    out = entropy_bonus(ent, mask, coef=0.02, aggregation=mode, max_tokens=7)
    total, count = np_aggregate(-0.02 * ent.astype(np.float64), mask, mode, max_tokens=7)
    _allclose(out[0], total)
    assert float(out[1]) == count
    _allclose(_m(out[2])["entropy"], ent[mask > 0].astype(np.float64).mean())


ent_st = float_array_strategy((B, T), 0.0, 5.0)


@given(ent=ent_st, mask=mask_strategy(B, T), k=st.integers(0, B))
def test_entropy_bonus_property_micro_batched_equals_whole(ent, mask, k):
    for mode in MODES:
        _check_split(entropy_bonus, (ent,), mask, k,
                     dict(coef=0.01, aggregation=mode, max_tokens=T), atol=1e-5)


@given(ent=ent_st, mask=mask_strategy(B, T), coef=st.floats(0.0, 1.0, allow_subnormal=False),
       junk=st.sampled_from([NAN, INF]))
def test_entropy_bonus_property_linear_in_coef_and_mask(ent, mask, coef, junk):
    """loss(coef) = coef * loss(1) <= 0 for H >= 0; masked junk changes nothing."""
    one = _jit(entropy_bonus, coef=1.0)(ent, mask)
    dirty = np.where(mask > 0, ent, junk).astype(np.float32)
    out = entropy_bonus(dirty, mask, coef=coef)
    _allclose(out[0], coef * float(one[0]), atol=1e-5)
    assert float(one[0]) <= 0.0
    g = jax.grad(lambda e: entropy_bonus(e, mask, coef=coef)[0])(dirty)
    _allclose(g, -coef * mask, atol=1e-7)


def test_entropy_bonus_grad():
    r = rng(32)
    ent = jnp.asarray(r.uniform(0, 3, (3, 4)), jnp.float32)
    mask = random_mask(r, 3, 4, empty_rows=1)
    # gradient of the mean (sum / count) under token_mean: -coef / count per valid token
    g = jax.grad(lambda e: (lambda o: o[0] / o[1])(entropy_bonus(e, mask, coef=0.05)))(ent)
    _allclose(g, -0.05 * mask / mask.sum(), atol=1e-7)
    for mode in MODES:
        f = lambda e: entropy_bonus(e, mask, coef=0.05, aggregation=mode)[0]  # noqa: E731
        check_grads(f, (ent,), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    empty = jnp.zeros((3, 4))
    g = jax.grad(lambda e: entropy_bonus(e, empty, coef=0.05)[0])(ent)
    assert np.all(np.asarray(g) == 0.0)
