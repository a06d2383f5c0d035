"""Tests of the GRPO family (rlhf_jax/losses/grpo.py): grpo_loss and gspo_loss.

GRPO per token: ``l = max(-A r, -A clip(r, 1 - lo, 1 + hi)) + beta KL_t`` aggregated by mode;
GSPO per sequence: ``s_i = exp(mean_t (logp - old_logp))``, ``l_i = max(-A s, -A clip(s))``.
KL estimators with ``lr = ref_logp - logp``: k1 = -lr, k2 = lr^2 / 2, k3 = expm1(lr) - lr.
Handy: ln 2 = 0.693147; at lr = ln 2: k1 = -0.693147, k2 = 0.240227, k3 = 0.306853.
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

from rlhf_jax.losses import grpo_loss, gspo_loss
from rlhf_jax.ops.aggregation import AGGREGATIONS
from rlhf_jax.ops.kl import KL_ESTIMATORS
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

B, T = 4, 5
MODES = sorted(AGGREGATIONS)
ESTIMATORS = sorted(KL_ESTIMATORS)
NAN, INF = float("nan"), float("inf")
LN2 = math.log(2.0)


def _allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _m(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in compute_metrics(metrics).items()}


@functools.lru_cache(maxsize=None)
def _jit(fn, **kw):
    return jax.jit(functools.partial(fn, **kw))


@functools.lru_cache(maxsize=None)
def _loss_and_grads(fn, **kw):
    """Jitted ``(out, grads of loss_sum w.r.t. logp, old_logp, ref_logp)``."""
    def run(logp, old, adv, mask, ref):
        f = lambda a, b, c: fn(a, b, adv, mask, ref_logp=c, **kw)  # noqa: E731
        (_, out), g = jax.value_and_grad(lambda a, b, c: (f(a, b, c)[0], f(a, b, c)),
                                         argnums=(0, 1, 2), has_aux=True)(logp, old, ref)
        return out, g
    return jax.jit(run)


def _check_split(fn, arrays, adv, mask, k, kw, atol=1e-4):
    """Micro-batched equals whole: sums and counts of rows [:k] and [k:] add to the whole's."""
    whole = _jit(fn, **kw)(arrays[0], arrays[1], adv, mask, ref_logp=arrays[2])
    a = fn(arrays[0][:k], arrays[1][:k], adv[:k], mask[:k], ref_logp=arrays[2][:k], **kw)
    b = fn(arrays[0][k:], arrays[1][k:], adv[k:], mask[k:], ref_logp=arrays[2][k:], **kw)
    _allclose(a[0] + b[0], whole[0], atol=atol)
    assert float(a[1] + b[1]) == float(whole[1])
    assert_trees_close(compute_metrics(merge_metrics(a[2], b[2])), compute_metrics(whole[2]),
                       rtol=1e-5, atol=atol)


# ------------------------------------------------------------------------------ NumPy references
def _np_kl(est, logp, ref, clamp=20.0):
    lr = min(max(float(ref) - float(logp), -clamp), clamp)
    return {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.expm1(lr) - lr,
            "k3_st": math.expm1(lr) - lr}[est]


def np_grpo(logp, old, adv, mask, ref, *, kl_coef, est, lo, hi, mode, max_tokens=None):
    b, t = logp.shape
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (b, t))
    norm = float(t if max_tokens is None else max_tokens)
    total, count = 0.0, 0.0
    for i in range(b):
        row, n = 0.0, 0
        for j in range(t):
            if not mask[i, j]:
                continue
            lr = min(max(float(logp[i, j]) - float(old[i, j]), -20.0), 20.0)
            r, a = math.exp(lr), float(adv[i, j])
            tok = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            if ref is not None:
                tok += kl_coef * _np_kl(est, logp[i, j], ref[i, j])
            row += tok
            n += 1
        if mode == "token_mean":
            total, count = total + row, count + n
        elif n:
            count += 1
            total += {"seq_mean_token_mean": row / n, "seq_mean_token_sum": row,
                      "seq_mean_token_sum_norm": row / norm}[mode]
    return total, count


def np_gspo(logp, old, adv, mask, ref, *, kl_coef, est, lo, hi):
    total, count, clip, ratios = 0.0, 0.0, 0.0, []
    for i in range(logp.shape[0]):
        idx = [j for j in range(logp.shape[1]) if mask[i, j]]
        if not idx:
            continue
        lrs = [min(max(float(logp[i, j]) - float(old[i, j]), -20.0), 20.0) for j in idx]
        s, a = math.exp(sum(lrs) / len(idx)), float(adv[i])
        l_seq = max(-a * s, -a * min(max(s, 1 - lo), 1 + hi))
        if ref is not None:
            l_seq += kl_coef * sum(_np_kl(est, logp[i, j], ref[i, j]) for j in idx) / len(idx)
        total += l_seq
        count += 1
        clip += (s < 1 - lo and a < 0) or (s > 1 + hi and a > 0)
        ratios.append(s)
    return total, count, clip / max(count, 1), ratios


def _inputs(r, b, t, scale=0.5):
    old = -r.exponential(1.0, (b, t)).astype(np.float32)
    logp = (old + r.normal(0, scale, (b, t))).astype(np.float32)
    ref = (old + r.normal(0, scale, (b, t))).astype(np.float32)
    adv = r.normal(0, 1, b).astype(np.float32)
    return logp, old, ref, adv


# ----------------------------------------------------------------------------------- grpo: hand
G_LOGP = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], np.float32)
G_MASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
G_ADV = np.array([1.0, -2.0], np.float32)


def test_grpo_loss_hand_no_old_logp():
    # ratio 1: token loss -A; row 0: (-1 - 1) / 2 = -1, row 1: (2 + 2 + 2) / 3 = 2 -> sum 1
    f = lambda x: grpo_loss(x, None, G_ADV, G_MASK)  # noqa: E731
    out = f(G_LOGP)
    _allclose(out[0], 1.0)
    assert float(out[1]) == 2.0
    # gradient -A / |tokens| per token: row 0: -1/2, row 1: 2/3
    g = jax.grad(lambda x: f(x)[0])(G_LOGP)
    _allclose(g, [[-0.5, -0.5, 0.0], [2 / 3, 2 / 3, 2 / 3]])
    m = _m(out[2])
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == 1.0 and "kl" not in m


@pytest.mark.parametrize("est,kl_value,kl_grad,kl_grad_at_0", [
    ("k1", -LN2, 1.0, 1.0),              # k1 = logp - ref, d/dlogp = 1 everywhere
    ("k2", 0.5 * LN2 ** 2, -LN2, 0.0),   # 0.240227, d/dlogp (lr^2 / 2) = -lr
    ("k3", 1.0 - LN2, -1.0, 0.0),        # 0.306853, d/dlogp = 1 - e^lr = -1
    ("k3_st", 1.0 - LN2, -LN2, 0.0),     # value of k3, gradient of k2
])
def test_grpo_loss_hand_reference_kl(est, kl_value, kl_grad, kl_grad_at_0):
    # reference differs from the policy on token (0, 0) only: lr = ref - logp = ln 2
    ref = G_LOGP.copy()
    ref[0, 0] += LN2
    f = lambda x: grpo_loss(x, None, G_ADV, G_MASK, ref_logp=ref, kl_coef=0.1,  # noqa: E731
                            kl_estimator=est)
    out = f(G_LOGP)
    # row 0: (-1 + 0.1 kl - 1) / 2; row 1: 2
    _allclose(out[0], (-2.0 + 0.1 * kl_value) / 2 + 2.0)
    _allclose(_m(out[2])["kl"], kl_value / 5)  # mean over the 5 valid tokens
    g = jax.grad(lambda x: f(x)[0])(G_LOGP)
    _allclose(g[0, 0], (-1.0 + 0.1 * kl_grad) / 2)
    _allclose(g[0, 1], (-1.0 + 0.1 * kl_grad_at_0) / 2)  # lr = 0 on token (0, 1)
    _allclose(g[1], (2.0 + 0.1 * kl_grad_at_0) / 3)  # row 1: -A / 3 = 2/3 plus the KL's


def test_grpo_loss_hand_errors():
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(G_LOGP, None, G_ADV, G_MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        grpo_loss(G_LOGP, None, G_ADV, G_MASK, ref_logp=G_LOGP, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="unknown aggregation"):
        grpo_loss(G_LOGP, None, G_ADV, G_MASK, aggregation="mean")


def test_grpo_loss_hand_dr_grpo():
    # Dr.GRPO: ratio 1, A = (1, -1), mask rows of 2 and 1 tokens, constant normaliser 4:
    # token sums -2 and +1 -> (-2 + 1) / 4 = -0.25 over 2 sequences
    logp = np.full((2, 4), -1.0, np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    out = grpo_loss(logp, logp, np.array([1.0, -1.0], np.float32), mask,
                    aggregation="seq_mean_token_sum_norm", max_tokens=4)
    _allclose(out[0], -0.25)
    assert float(out[1]) == 2.0
    out = grpo_loss(logp, logp, np.array([1.0, -1.0], np.float32), mask,
                    aggregation="seq_mean_token_sum_norm", max_tokens=10)
    _allclose(out[0], -0.1)  # -1 / 10


def test_grpo_loss_hand_dapo_clip_higher():
    # DAPO: eps_low 0.2, eps_high 0.28, token_mean; tokens (A, r): (1, 1.25) (-1, 0.75) (1, 1.5)
    lr = np.log(np.array([[1.25, 0.75, 1.5]], np.float32))
    old = np.zeros((1, 3), np.float32)
    adv = np.array([[1.0, -1.0, 1.0]], np.float32)
    out = grpo_loss(lr, old, adv, None, clip_eps_low=0.2, clip_eps_high=0.28,
                    aggregation="token_mean")
    # (1, 1.25): 1.25 < 1.28, not clipped -> -1.25; (-1, .75): max(.75, .8) = .8;
    # (1, 1.5): clipped at -1.28. Sum = -1.73 over 3 tokens.
    _allclose(out[0], -1.25 + 0.8 - 1.28)
    assert float(out[1]) == 3.0
    m = _m(out[2])
    _allclose(m["clip_frac_high"], 1 / 3)
    _allclose(m["clip_frac_low"], 1 / 3)
    # symmetric eps 0.2 clips the first token too: -1.2 + 0.8 - 1.2
    out = grpo_loss(lr, old, adv, None, clip_eps_low=0.2, aggregation="token_mean")
    _allclose(out[0], -1.6)


# ---------------------------------------------------------------------------------- grpo: numpy
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("est", ESTIMATORS)
def test_grpo_loss_numpy(mode, est):
    r = rng(ESTIMATORS.index(est))
    logp, old, ref, adv = _inputs(r, 6, 5)
    mask = random_mask(r, 6, 5, empty_rows=1, single_rows=1)
    kw = dict(kl_coef=0.05, clip_eps_low=0.2, clip_eps_high=0.28)
    out = grpo_loss(logp, old, adv, mask, ref_logp=ref, kl_estimator=est, aggregation=mode,
                    max_tokens=7, **kw)
    want = np_grpo(logp, old, adv, mask, ref, est=est, lo=0.2, hi=0.28, mode=mode,
                   max_tokens=7, kl_coef=0.05)
    _allclose(out[0], want[0])
    assert float(out[1]) == want[1]
    kls = [_np_kl(est, logp[i, j], ref[i, j]) for i, j in zip(*np.nonzero(mask))]
    _allclose(_m(out[2])["kl"], np.mean(kls))


# ------------------------------------------------------------------------------- grpo: property
arr_st = float_array_strategy((3, B, T), -2.0, 2.0)
adv_st = float_array_strategy((B,), -2.0, 2.0)


def _arrays(x):
    old = (np.minimum(x[1], 0.0) - 0.1).astype(np.float32)
    return (old + x[0] / 2).astype(np.float32), old, (old + x[2] / 2).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=10)
@given(x=arr_st, adv=adv_st, mask=mask_strategy(B, T), k=st.integers(0, B),
       est=st.sampled_from(ESTIMATORS))
def test_grpo_loss_property_micro_batched_equals_whole(mode, x, adv, mask, k, est):
    kw = dict(kl_coef=0.1, kl_estimator=est, clip_eps_high=0.28, aggregation=mode,
              max_tokens=T)
    _check_split(grpo_loss, _arrays(x), adv, mask, k, kw)


@given(x=arr_st, adv=adv_st, mask=mask_strategy(B, T), junk=st.sampled_from([NAN, INF, -INF]))
def test_grpo_loss_property_mask_equals_slice(x, adv, mask, junk):
    """Junk in masked tokens changes neither the loss nor the metrics; its gradient is 0."""
    logp, old, ref = _arrays(x)
    dirty = [np.where(mask > 0, v, junk).astype(np.float32) for v in (logp, old, ref)]
    run = _loss_and_grads(grpo_loss, kl_coef=0.1)
    out, g = run(dirty[0], dirty[1], adv, mask, dirty[2])
    ref_out, _ = run(logp, old, adv, mask, ref)
    _allclose(out[0], ref_out[0])
    assert float(out[1]) == float(ref_out[1])
    assert_trees_close(_m(out[2]), _m(ref_out[2]), rtol=1e-5, atol=1e-5)
    assert_all_finite(g, "gradient")
    assert all(np.all(np.asarray(v)[mask == 0] == 0.0) for v in g)


@given(x=arr_st, adv=adv_st, mask=mask_strategy(B, T))
def test_grpo_loss_property_seq_advantages_equal_broadcast(x, adv, mask):
    logp, old, ref = _arrays(x)
    f = _jit(grpo_loss, kl_coef=0.1)
    a = f(logp, old, adv, mask, ref_logp=ref)
    b = f(logp, old, np.repeat(adv[:, None], T, 1), mask, ref_logp=ref)
    _allclose(a[0], b[0], atol=1e-6)
    assert float(a[1]) == float(b[1])


@given(x=arr_st, adv=adv_st, mask=mask_strategy(B, T))
def test_grpo_loss_property_no_old_logp_is_ratio_one(x, adv, mask):
    """old_logp=None equals old_logp=logp in value; gradient -A_i / n_i (seq_mean_token_mean);
    kl_coef=0 with a reference adds nothing to the loss."""
    logp, _, ref = _arrays(x)
    run = _loss_and_grads(grpo_loss)
    out, g = run(logp, logp, adv, mask, ref)
    none = _jit(grpo_loss)(logp, None, adv, mask)
    _allclose(none[0], out[0])
    n = np.maximum(mask.sum(-1), 1.0)
    _allclose(none[0], -(adv * (mask.sum(-1) > 0)).sum(), atol=1e-5)
    g_none = jax.grad(lambda a: grpo_loss(a, None, adv, mask)[0])(logp)
    _allclose(g_none, -adv[:, None] * mask / n[:, None], atol=1e-6)
    assert "kl" in out[2]  # the reference's KL is still reported


@pytest.mark.parametrize("v", EXTREME_LOG_RATIOS)
@pytest.mark.parametrize("side", ["logp", "old_logp", "ref_logp"])
def test_grpo_loss_property_extreme_log_ratios(v, side):
    base = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]], np.float32)
    logp, old, ref = base.copy(), base.copy(), base.copy()
    if side == "logp":
        logp[:, 0] = base[:, 0] + v
    elif side == "old_logp":
        old[:, 0] = base[:, 0] - v
    else:
        ref[:, 0] = base[:, 0] - v
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones((2, 3), np.float32)
    for est in ESTIMATORS:
        for mode in ("seq_mean_token_mean", "token_mean"):
            out, g = _loss_and_grads(grpo_loss, kl_coef=0.1, kl_estimator=est,
                                     aggregation=mode)(logp, old, adv, mask, ref)
            assert_all_finite((out[:2], _m(out[2])), f"loss {est} {mode}")
            assert_all_finite(g, f"gradient {est} {mode}")


def test_grpo_loss_property_empty_mask():
    logp, old, ref, adv = _inputs(rng(8), 3, 4)
    empty = np.zeros((3, 4), np.float32)
    for mode in MODES:
        out, g = _loss_and_grads(grpo_loss, kl_coef=0.1, aggregation=mode)(
            logp, old, adv, empty, ref)
        assert float(out[0]) == 0.0 and float(out[1]) == 0.0
        assert all(np.all(np.asarray(x) == 0.0) for x in g)


# ----------------------------------------------------------------------------------- grpo: grad
@pytest.mark.parametrize("est", ESTIMATORS)
def test_grpo_loss_grad_check_grads(est):
    r = rng(9)
    while True:  # ratios away from the clip kinks 0.8 and 1.28
        logp, old, ref, adv = _inputs(r, 2, 4)
        ratio = np.exp(logp.astype(np.float64) - old)
        if min(np.abs(ratio - 0.8).min(), np.abs(ratio - 1.28).min()) > 0.03:
            break
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], np.float32)
    f = lambda a, b: grpo_loss(a, b, adv, mask, ref_logp=ref, kl_coef=0.1,  # noqa: E731
                               kl_estimator=est, clip_eps_high=0.28)[0]
    if est == "k3_st":  # value of k3, gradient of k2: not a true gradient, check it analytically
        g = jax.grad(f)(logp, old)
        g0 = jax.grad(lambda a, b: grpo_loss(a, b, adv, mask, ref_logp=ref, kl_coef=0.1,
                                             kl_estimator="k2", clip_eps_high=0.28)[0])(logp, old)
        _allclose(g, g0, atol=1e-6)
    else:
        check_grads(f, (jnp.asarray(logp), jnp.asarray(old)), order=1, modes=["rev"],
                    eps=1e-3, atol=1e-2, rtol=1e-2)


def test_grpo_loss_grad_ratio_one_token_mean():
    """old_logp=None, token_mean: gradient of the mean (sum / count) is -A_i / |all tokens|."""
    logp, _, _, adv = _inputs(rng(10), 3, 5)
    mask = random_mask(rng(11), 3, 5, single_rows=1)
    g = jax.grad(lambda a: (lambda o: o[0] / o[1])(
        grpo_loss(a, None, adv, mask, aggregation="token_mean")))(logp)
    _allclose(g, -adv[:, None] * mask / mask.sum(), atol=1e-6)


# ----------------------------------------------------------------------------------- gspo: hand
S_OLD = np.array([[-1.0, -2.0], [-0.5, -1.5], [-1.0, -1.0]], np.float32)
S_LR = np.array([[LN2, 0.0], [-LN2, 9.0], [3.0, 3.0]], np.float32)
S_LOGP = (S_OLD + S_LR).astype(np.float32)
S_ADV = np.array([1.0, -1.0, 3.0], np.float32)
S_MASK = np.array([[1, 1], [1, 0], [0, 0]], np.float32)
# row 0: s = exp((ln 2 + 0) / 2) = sqrt 2 = 1.414214, A = 1: max(-1.414214, -1.5) unclipped
# row 1: s = exp(ln .5 / 1) = .5 (the masked 9 is ignored), A = -1: max(.5, .8) = .8 clipped
# row 2: empty, not counted. Sum -0.614214 over 2 sequences.


def test_gspo_loss_hand_sequence_ratio():
    f = lambda x: gspo_loss(x, S_OLD, S_ADV, S_MASK, clip_eps_low=0.2,  # noqa: E731
                            clip_eps_high=0.5)
    out = f(S_LOGP)
    _allclose(out[0], -math.sqrt(2) + 0.8)
    assert float(out[1]) == 2.0
    m = _m(out[2])
    _allclose(m["clip_frac"], 0.5)
    _allclose(m["ratio_mean"], (math.sqrt(2) + 0.5) / 2)  # 0.957107
    _allclose(m["ratio_max"], math.sqrt(2))
    _allclose(m["ratio_min"], 0.5)
    # d/dlogp_t of -A s = -A s / n: row 0: -sqrt2 / 2 = -0.707107 per token; row 1 clipped: 0
    g = jax.grad(lambda x: f(x)[0])(S_LOGP)
    _allclose(g, [[-math.sqrt(2) / 2] * 2, [0.0, 0.0], [0.0, 0.0]])


def test_gspo_loss_hand_paper_clip_range_and_kl():
    # default eps (3e-4, 4e-4): both rows clip: -(1 + 4e-4) + (1 - 3e-4) = -7e-4
    out = gspo_loss(S_LOGP, S_OLD, S_ADV, S_MASK)
    _allclose(out[0], -7e-4, atol=1e-6)
    _allclose(_m(out[2])["clip_frac"], 1.0)
    # k3 KL with ref = logp + ln 2 on row 0 token 0 only: + 0.1 * (0.306853 + 0) / 2
    ref = S_LOGP.copy()
    ref[0, 0] += LN2
    out = gspo_loss(S_LOGP, S_OLD, S_ADV, S_MASK, ref_logp=ref, kl_coef=0.1)
    _allclose(out[0], -7e-4 + 0.1 * (1 - LN2) / 2, atol=1e-6)
    _allclose(_m(out[2])["kl"], (1 - LN2) / 3)  # token mean over the 3 valid tokens
    with pytest.raises(ValueError, match="needs ref_logp"):
        gspo_loss(S_LOGP, S_OLD, S_ADV, S_MASK, kl_coef=0.1)


def test_gspo_loss_hand_no_old_logp():
    # s = 1; gradient -A_i / n_i: row 0: -1/2 each, row 1: +1 on its one token, row 2: 0
    g = jax.grad(lambda x: gspo_loss(x, None, S_ADV, S_MASK)[0])(S_LOGP)
    _allclose(g, [[-0.5, -0.5], [1.0, 0.0], [0.0, 0.0]])
    out = gspo_loss(S_LOGP, None, S_ADV, S_MASK)
    _allclose(out[0], -1.0 + 1.0)  # -A_0 - A_1


# ---------------------------------------------------------------------------------- gspo: numpy
@pytest.mark.parametrize("seed,est", [(0, None), (1, "k3"), (2, "k1"), (3, "k2")])
def test_gspo_loss_numpy(seed, est):
    r = rng(seed)
    logp, old, ref, adv = _inputs(r, 7, 5, scale=0.3)
    mask = random_mask(r, 7, 5, empty_rows=1, single_rows=1)
    kw = dict(clip_eps_low=0.1, clip_eps_high=0.15)
    coef = 0.0 if est is None else 0.2
    out = gspo_loss(logp, old, adv, mask, ref_logp=None if est is None else ref, kl_coef=coef,
                    kl_estimator=est or "k3", **kw)
    total, count, clip, ratios = np_gspo(logp, old, adv, mask, None if est is None else ref,
                                         kl_coef=coef, est=est, lo=0.1, hi=0.15)
    _allclose(out[0], total)
    assert float(out[1]) == count
    m = _m(out[2])
    _allclose(m["clip_frac"], clip)
    _allclose(m["ratio_mean"], np.mean(ratios))
    _allclose(m["ratio_max"], max(ratios))
    _allclose(m["ratio_min"], min(ratios))


# ------------------------------------------------------------------------------- gspo: property
@settings(max_examples=15)
@given(x=arr_st, adv=adv_st, mask=mask_strategy(B, T), k=st.integers(0, B))
def test_gspo_loss_property_micro_batched_equals_whole(x, adv, mask, k):
    _check_split(gspo_loss, _arrays(x), adv, mask, k,
                 dict(kl_coef=0.1, clip_eps_low=0.2, clip_eps_high=0.3))


@given(x=arr_st, adv=adv_st, mask=mask_strategy(B, T), junk=st.sampled_from([NAN, INF, -INF]))
def test_gspo_loss_property_empty_rows_and_masked_junk(x, adv, mask, junk):
    """Count = non-empty rows; junk (and any advantage) in masked tokens / empty rows is ignored."""
    logp, old, ref = _arrays(x)
    dirty = [np.where(mask > 0, v, junk).astype(np.float32) for v in (logp, old, ref)]
    live = mask.sum(-1) > 0
    adv_dirty = np.where(live, adv, 1e6).astype(np.float32)
    run = _loss_and_grads(gspo_loss, kl_coef=0.1, clip_eps_low=0.2, clip_eps_high=0.3)
    out, g = run(dirty[0], dirty[1], adv_dirty, mask, dirty[2])
    assert float(out[1]) == live.sum()
    ref_out = gspo_loss(logp[live], old[live], adv[live], mask[live], ref_logp=ref[live],
                        kl_coef=0.1, clip_eps_low=0.2, clip_eps_high=0.3)
    _allclose(out[0], ref_out[0])
    assert_trees_close(_m(out[2]), _m(ref_out[2]), rtol=1e-5, atol=1e-5)
    assert_all_finite(g, "gradient")
    assert all(np.all(np.asarray(v)[mask == 0] == 0.0) for v in g)


@pytest.mark.parametrize("v", EXTREME_LOG_RATIOS)
@pytest.mark.parametrize("side", ["logp", "old_logp", "ref_logp"])
def test_gspo_loss_property_extreme_log_ratios(v, side):
    base = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]], np.float32)
    logp, old, ref = base.copy(), base.copy(), base.copy()
    {"logp": logp, "old_logp": old, "ref_logp": ref}[side][:, 0] += v if side == "logp" else -v
    adv = np.array([1.0, -1.0], np.float32)
    mask = np.ones((2, 3), np.float32)
    for est in ESTIMATORS:
        out, g = _loss_and_grads(gspo_loss, kl_coef=0.1, kl_estimator=est)(
            logp, old, adv, mask, ref)
        assert_all_finite((out[:2], _m(out[2])), f"loss {est}")
        assert_all_finite(g, f"gradient {est}")
        assert _m(out[2])["ratio_max"] <= math.exp(20.0) * (1 + 1e-6)


# ----------------------------------------------------------------------------------- gspo: grad
def test_gspo_loss_grad_check_grads():
    r = rng(12)
    while True:  # sequence ratios away from the clip kinks 0.8 and 1.3
        logp, old, ref, adv = _inputs(r, 3, 4, scale=0.4)
        mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 0, 0]], np.float32)
        s = np.exp(((logp.astype(np.float64) - old) * mask).sum(-1) / mask.sum(-1))
        if min(np.abs(s - 0.8).min(), np.abs(s - 1.3).min()) > 0.03:
            break
    f = lambda a, b, c: gspo_loss(a, b, adv, mask, ref_logp=c, kl_coef=0.1,  # noqa: E731
                                  clip_eps_low=0.2, clip_eps_high=0.3)[0]
    check_grads(f, (jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref)), order=1,
                modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_gspo_loss_grad_analytic_unclipped():
    """Unclipped: d/dlogp_t (-A s) = -A s / n on every valid token of the sequence."""
    logp, old, _, adv = _inputs(rng(13), 4, 5, scale=0.05)
    mask = random_mask(rng(14), 4, 5, empty_rows=1)
    g = jax.grad(lambda a: gspo_loss(a, old, adv, mask, clip_eps_low=0.9,
                                     clip_eps_high=9.0)[0])(logp)
    n = np.maximum(mask.sum(-1), 1.0)
    s = np.exp(((logp.astype(np.float64) - old) * mask).sum(-1) / n)
    _allclose(g, (-adv * s / n)[:, None] * mask, atol=1e-6)
