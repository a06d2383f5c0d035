"""Tests of the distillation losses (rlhf_jax/losses/distill.py).

Each loss is ``tau^2 D(p_teacher, p_student)`` per valid token (distributions at temperature
``tau``), aggregated to ``(loss_sum, count)``; the metric is the token mean of the unscaled D.
Hand case used below (2-token vocabulary): teacher logits (log 3, 0) -> p_T = (3/4, 1/4);
student logits (0, 0) -> p_S = (1/2, 1/2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.losses import (
    DISTILL_LOSSES,
    forward_kl_distill_loss,
    jsd_distill_loss,
    reverse_kl_distill_loss,
)
from rlhf_jax.ops.aggregation import AGGREGATIONS
from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from tests.helpers import (
    assert_all_finite,
    check_grads,
    float_array_strategy,
    mask_strategy,
    np_log_softmax,
    random_mask,
    rng,
)

B, T, V = 3, 4, 5  # fixed shapes for the property tests
INF, NAN = float("inf"), float("nan")
LOSSES = {"forward_kl": forward_kl_distill_loss, "reverse_kl": reverse_kl_distill_loss,
          "jsd": jsd_distill_loss}
MODES = sorted(AGGREGATIONS)
LOG3 = math.log(3.0)


def _allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _metric(out):
    (value,) = compute_metrics(out[2]).values()
    return float(value)


def _two_token(teacher=(LOG3, 0.0), student=(0.0, 0.0), scale=1.0):
    s = np.array([[student]], np.float32) * scale
    t = np.array([[teacher]], np.float32) * scale
    return s, t, np.ones((1, 1), np.float32)


# ----------------------------------------------------------------------------- NumPy reference
def _np_kl(lp, lq):
    """sum_v p (log p - log q) with 0 log 0 = 0, float64."""
    total = 0.0
    for a, b in zip(lp, lq):
        if a > -np.inf:
            total += math.exp(a) * (a - b)
    return total


def np_divergence(name, s_row, t_row, tau, beta=0.5):
    ls, lt = np_log_softmax(s_row / tau), np_log_softmax(t_row / tau)
    if name == "forward_kl":
        return _np_kl(lt, ls)
    if name == "reverse_kl":
        return _np_kl(ls, lt)
    m = beta * np.exp(lt) + (1 - beta) * np.exp(ls)
    with np.errstate(divide="ignore"):
        lm = np.log(m)
    return beta * _np_kl(lt, lm) + (1 - beta) * _np_kl(ls, lm)


def np_reference(name, s, t, mask, *, tau=1.0, mode="token_mean", beta=0.5):
    """Plain loops: per-token divergence, then the aggregation of ``ops.aggregation``."""
    b_, t_ = mask.shape
    total, count, rows, metric_sum = 0.0, 0.0, 0.0, 0.0
    for b in range(b_):
        row_sum, row_n = 0.0, 0
        for i in range(t_):
            if mask[b, i]:
                d = np_divergence(name, np.float64(s[b, i]), np.float64(t[b, i]), tau, beta)
                metric_sum += d
                row_sum += tau**2 * d
                row_n += 1
        count += row_n
        if row_n:
            rows += 1
            total += row_sum / row_n if mode == "seq_mean_token_mean" else row_sum
    metric = metric_sum / count if count else 0.0
    if mode == "token_mean":
        return total, count, metric
    if mode == "seq_mean_token_sum_norm":
        total /= t_
    return total, rows, metric


# ------------------------------------------------------------------------------- shared checks
def _check_numpy(name, seed, **kw):
    r = rng(seed)
    s = (3 * r.standard_normal((4, 6, 7))).astype(np.float32)
    t = (3 * r.standard_normal((4, 6, 7))).astype(np.float32)
    mask = random_mask(r, 4, 6, empty_rows=1, single_rows=1)
    for mode in MODES:
        for tau in (1.0, 1.7):
            out = LOSSES[name](s, t, mask, temperature=tau, aggregation=mode, **kw)
            total, count, metric = np_reference(name, s, t, mask, tau=tau, mode=mode, **kw)
            _allclose(out[0], total)
            assert float(out[1]) == count
            _allclose(_metric(out), metric)


def _check_micro_batched(name, s, t, mask, k, mode):
    whole = LOSSES[name](s, t, mask, aggregation=mode)
    a = LOSSES[name](s[:k], t[:k], mask[:k], aggregation=mode, max_tokens=T)
    b = LOSSES[name](s[k:], t[k:], mask[k:], aggregation=mode, max_tokens=T)
    _allclose(a[0] + b[0], whole[0])
    assert float(a[1] + b[1]) == float(whole[1])
    _allclose(_metric((0, 0, merge_metrics(a[2], b[2]))), _metric(whole))


def _check_mask_equals_slice(name, s, t, mask, mode, perm_seed):
    """Masked positions may hold NaN/inf (value and gradient unchanged); empty rows can be sliced
    off; and tokens are independent, so permuting them inside a row changes nothing."""
    clean = LOSSES[name](s, t, mask, aggregation=mode)
    m3 = (mask > 0)[..., None]
    s_junk, t_junk = np.where(m3, s, NAN).astype(np.float32), np.where(m3, t, INF)
    f = lambda x: LOSSES[name](x, t_junk, mask, aggregation=mode)  # noqa: E731
    junk = f(s_junk)
    _allclose(junk[0], clean[0])
    assert float(junk[1]) == float(clean[1])
    _allclose(_metric(junk), _metric(clean))
    g = np.asarray(jax.grad(lambda x: f(x)[0])(s_junk))
    assert_all_finite(g, "gradient")
    assert np.all(g[~np.broadcast_to(m3, g.shape)] == 0.0)
    rows = mask.sum(-1) > 0
    sliced = LOSSES[name](s[rows], t[rows], mask[rows], aggregation=mode, max_tokens=T)
    _allclose(sliced[0], clean[0])
    assert float(sliced[1]) == float(clean[1])
    perm = np.random.default_rng(perm_seed).permutation(T)
    shuffled = LOSSES[name](s[:, perm], t[:, perm], mask[:, perm], aggregation=mode)
    _allclose(shuffled[0], clean[0])


def _check_temperature(name, s, t, mask, tau):
    """Temperature divides the logits by tau and multiplies the loss by tau^2."""
    hot = LOSSES[name](s, t, mask, temperature=tau)
    cold = LOSSES[name](s / np.float32(tau), t / np.float32(tau), mask, temperature=1.0)
    _allclose(hot[0], tau**2 * float(cold[0]), rtol=1e-4, atol=1e-5)
    _allclose(_metric(hot), _metric(cold), rtol=1e-4, atol=1e-6)


def _check_nonneg_zero(name, s, t, mask):
    out = LOSSES[name](s, t, mask, temperature=1.3)
    assert float(out[0]) >= -1e-5
    same = LOSSES[name](s, s, mask, temperature=1.3)
    assert abs(float(same[0])) <= 1e-5
    # and strictly positive when some valid token has different distributions
    ps, pt = np.exp(np_log_softmax(s / 1.3)), np.exp(np_log_softmax(t / 1.3))
    gap = (np.abs(ps - pt).max(-1) * mask).max()
    if gap > 0.1:
        assert float(out[0]) > 1e-5


def _check_grads_random(name, seed):
    r = rng(seed)
    s = jnp.asarray(r.standard_normal((2, 3, 4)), jnp.float32)
    t = jnp.asarray(r.standard_normal((2, 3, 4)), jnp.float32)
    mask = jnp.asarray(random_mask(r, 2, 3, single_rows=1))
    for mode in ("token_mean", "seq_mean_token_mean"):
        f = lambda x, y: LOSSES[name](x, y, mask, temperature=1.5, aggregation=mode)[0]  # noqa
        check_grads(f, (s, t), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def _check_empty_single_extreme(name):
    r = rng(4)
    s = jnp.asarray(r.standard_normal((2, 3, 4)), jnp.float32)
    t = jnp.asarray(r.standard_normal((2, 3, 4)), jnp.float32)
    single = np.array([[0, 1, 0], [0, 0, 0]], np.float32)
    for mask, n in ((np.zeros((2, 3), np.float32), 0), (single, 1)):
        for mode in MODES:
            f = lambda x: LOSSES[name](x, t, mask, aggregation=mode)  # noqa: E731
            out, g = f(s), jax.grad(lambda x: f(x)[0])(s)
            assert float(out[1]) == n
            assert_all_finite((out, g))
            if n == 0:
                assert float(out[0]) == 0.0 and np.all(np.asarray(g) == 0.0)
    # extreme but finite logits: +-50, +-100
    for v in (50.0, -50.0, 100.0, -100.0):
        s_x = s.at[..., 0].set(v)
        t_x = t.at[..., 1].set(-v)
        f = lambda x: LOSSES[name](x, t_x, jnp.ones((2, 3)))[0]  # noqa: E731
        assert_all_finite((f(s_x), jax.grad(f)(s_x)), f"{name} at {v}")


# ---------------------------------------------------------------------------------- forward KL
def test_forward_kl_distill_loss_hand():
    # KL(p_T || p_S) = 3/4 log(3/4 / 1/2) + 1/4 log(1/4 / 1/2) = 0.75 log 1.5 - 0.25 log 2
    #                = 0.304099 - 0.173287 = 0.130812
    out = forward_kl_distill_loss(*_two_token())
    _allclose(out[0], 0.130812)
    assert float(out[1]) == 1.0
    # tau = 2 with logits doubled: same distributions, loss times 4 = 0.523248; metric unscaled
    out = forward_kl_distill_loss(*_two_token(scale=2.0), temperature=2.0)
    _allclose(out[0], 0.523248)
    _allclose(_metric(out), 0.130812)
    # identical student and teacher: exactly 0
    s, _, m = _two_token()
    assert float(forward_kl_distill_loss(s, s, m)[0]) == 0.0


def test_forward_kl_distill_loss_hand_aggregation():
    # Row 0: tokens (KL 0.130812, KL 0); row 1: one token (KL 0.130812), one padding.
    s = np.zeros((2, 2, 2), np.float32)
    t = np.array([[[LOG3, 0], [0, 0]], [[LOG3, 0], [9, 9]]], np.float32)
    mask = np.array([[1, 1], [1, 0]], np.float32)
    k = 0.130812
    want = {"token_mean": (2 * k, 3), "seq_mean_token_mean": (k / 2 + k, 2),
            "seq_mean_token_sum": (2 * k, 2), "seq_mean_token_sum_norm": (2 * k / 2, 2)}
    for mode, (total, count) in want.items():
        out = forward_kl_distill_loss(s, t, mask, aggregation=mode)
        _allclose(out[0], total)
        assert float(out[1]) == count
        _allclose(_metric(out), 2 * k / 3)  # the metric is always the token mean


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_kl_distill_loss_numpy(seed):
    _check_numpy("forward_kl", seed)


logits_st = float_array_strategy((B, T, V), -8.0, 8.0)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T))
def test_forward_kl_distill_loss_property_nonnegative_zero_iff_equal(s, t, mask):
    _check_nonneg_zero("forward_kl", s, t, mask)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), k=st.integers(0, B),
       mode=st.sampled_from(MODES))
def test_forward_kl_distill_loss_property_micro_batched_equals_whole(s, t, mask, k, mode):
    _check_micro_batched("forward_kl", s, t, mask, k, mode)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), mode=st.sampled_from(MODES),
       seed=st.integers(0, 100))
def test_forward_kl_distill_loss_property_mask_equals_slice(s, t, mask, mode, seed):
    _check_mask_equals_slice("forward_kl", s, t, mask, mode, seed)


@given(s=logits_st, t=logits_st, tau=st.sampled_from([0.5, 2.0, 3.0]))
def test_forward_kl_distill_loss_property_temperature(s, t, tau):
    _check_temperature("forward_kl", s, t, np.ones((B, T), np.float32), tau)


def test_forward_kl_distill_loss_property_bad_temperature_raises():
    for fn in LOSSES.values():
        for tau in (0.0, -1.0, NAN):
            with pytest.raises(ValueError, match="temperature"):
                fn(*_two_token(), temperature=tau)
    with pytest.raises(ValueError, match="aggregation"):
        forward_kl_distill_loss(*_two_token(), aggregation="mean")


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_kl_distill_loss_grad_check(seed):
    _check_grads_random("forward_kl", seed)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_forward_kl_distill_loss_grad_analytic(tau):
    # one token, token_mean: d/ds [tau^2 KL(p_T || p_S)] = tau (p_S - p_T), p = softmax(./tau)
    r = rng(11)
    s = jnp.asarray(r.standard_normal((1, 1, 6)) * 2, jnp.float32)
    t = jnp.asarray(r.standard_normal((1, 1, 6)) * 2, jnp.float32)
    g = jax.grad(lambda x: forward_kl_distill_loss(x, t, jnp.ones((1, 1)), temperature=tau)[0])(s)
    ps = np.exp(np_log_softmax(np.asarray(s) / tau))
    pt = np.exp(np_log_softmax(np.asarray(t) / tau))
    _allclose(g, tau * (ps - pt), atol=1e-6)


def test_forward_kl_distill_loss_grad_masked_vocabulary():
    # Teacher gives -inf to some entries (masked vocabulary): 0 log 0 = 0, finite everywhere.
    r = rng(12)
    s = r.standard_normal((2, 3, 5)).astype(np.float32)
    t = r.standard_normal((2, 3, 5)).astype(np.float32)
    t[..., 3:] = -INF
    mask = np.ones((2, 3), np.float32)
    f = lambda x: forward_kl_distill_loss(x, t, mask, temperature=1.5)  # noqa: E731
    out, g = f(s), jax.grad(lambda x: f(x)[0])(s)
    assert_all_finite((out, g))
    _allclose(out[0], np_reference("forward_kl", s, t, mask, tau=1.5)[0])
    # analytic: tau (p_S - p_T) for each token
    ps = np.exp(np_log_softmax(s / 1.5))
    pt = np.exp(np_log_softmax(t / 1.5))
    _allclose(g, 1.5 * (ps - pt), atol=1e-6)
    # the student masking the same entries is finite too
    s2 = np.where(np.isinf(t), -INF, s).astype(np.float32)
    assert_all_finite((f(s2), jax.grad(lambda x: f(x)[0])(s2)))
    _check_empty_single_extreme("forward_kl")


# ---------------------------------------------------------------------------------- reverse KL
def test_reverse_kl_distill_loss_hand():
    # KL(p_S || p_T) = 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4) = -0.202733 + 0.346574 = 0.143841
    out = reverse_kl_distill_loss(*_two_token())
    _allclose(out[0], 0.143841)
    out = reverse_kl_distill_loss(*_two_token(scale=3.0), temperature=3.0)
    _allclose(out[0], 9 * 0.143841)  # tau^2 = 9
    _allclose(_metric(out), 0.143841)
    s, _, m = _two_token()
    assert float(reverse_kl_distill_loss(s, s, m)[0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_kl_distill_loss_numpy(seed):
    _check_numpy("reverse_kl", seed)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T))
def test_reverse_kl_distill_loss_property_nonnegative_zero_iff_equal(s, t, mask):
    _check_nonneg_zero("reverse_kl", s, t, mask)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), k=st.integers(0, B),
       mode=st.sampled_from(MODES))
def test_reverse_kl_distill_loss_property_micro_batched_equals_whole(s, t, mask, k, mode):
    _check_micro_batched("reverse_kl", s, t, mask, k, mode)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), mode=st.sampled_from(MODES),
       seed=st.integers(0, 100))
def test_reverse_kl_distill_loss_property_mask_equals_slice(s, t, mask, mode, seed):
    _check_mask_equals_slice("reverse_kl", s, t, mask, mode, seed)


@given(s=logits_st, t=logits_st, tau=st.sampled_from([0.5, 2.0, 3.0]))
def test_reverse_kl_distill_loss_property_temperature_and_swap(s, t, tau):
    ones = np.ones((B, T), np.float32)
    _check_temperature("reverse_kl", s, t, ones, tau)
    # reverse KL of (s, t) is forward KL of (t, s)
    _allclose(reverse_kl_distill_loss(s, t, ones, temperature=tau)[0],
              forward_kl_distill_loss(t, s, ones, temperature=tau)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_reverse_kl_distill_loss_grad_check(seed):
    _check_grads_random("reverse_kl", seed)


def test_reverse_kl_distill_loss_grad_analytic_and_masked_vocabulary():
    # d/ds [tau^2 KL(p_S || p_T)] = tau p_S (log p_S - log p_T - KL) for one token.
    r = rng(13)
    tau = 2.0
    s = r.standard_normal((1, 1, 6)).astype(np.float32) * 2
    t = r.standard_normal((1, 1, 6)).astype(np.float32) * 2
    g = jax.grad(lambda x: reverse_kl_distill_loss(x, t, np.ones((1, 1)), temperature=tau)[0])(s)
    ls, lt = np_log_softmax(s / tau), np_log_softmax(t / tau)
    kl = (np.exp(ls) * (ls - lt)).sum(-1, keepdims=True)
    _allclose(g, tau * np.exp(ls) * (ls - lt - kl), atol=1e-6)
    # Masked vocabulary shared by student and teacher: finite value and gradient.
    s, t = r.standard_normal((2, 3, 5)).astype(np.float32), r.standard_normal((2, 3, 5))
    s[..., 3:], t[..., 3:] = -INF, -INF
    f = lambda x: reverse_kl_distill_loss(x, t.astype(np.float32), np.ones((2, 3)))  # noqa
    assert_all_finite((f(s), jax.grad(lambda x: f(x)[0])(s)))
    _allclose(f(s)[0], np_reference("reverse_kl", s, t, np.ones((2, 3)))[0])
    # Teacher-only -inf where the student has mass: KL(p_S || p_T) is +inf by definition.
    s_live = np.zeros((1, 1, 2), np.float32)
    assert float(reverse_kl_distill_loss(s_live, np.array([[[0.0, -INF]]], np.float32),
                                         np.ones((1, 1)))[0]) == INF
    _check_empty_single_extreme("reverse_kl")


# ----------------------------------------------------------------------------------------- JSD
def test_jsd_distill_loss_hand():
    # M = (P + Q)/2 = (5/8, 3/8). KL(P||M) = 3/4 log(6/5) + 1/4 log(2/3) = 0.136741 - 0.101366
    # = 0.035375; KL(Q||M) = 1/2 log(4/5) + 1/2 log(4/3) = -0.111572 + 0.143841 = 0.032269;
    # JSD = (0.035375 + 0.032269) / 2 = 0.033822
    out = jsd_distill_loss(*_two_token())
    _allclose(out[0], 0.033822)
    # disjoint supports: teacher (1, 0), student (0, 1) -> JSD = log 2 exactly
    out = jsd_distill_loss(*_two_token(teacher=(0.0, -INF), student=(-INF, 0.0)))
    _allclose(out[0], math.log(2))
    # beta = 0.25: M = P/4 + 3Q/4 = (9/16, 7/16);
    # JSD = 1/4 [3/4 log(4/3) + 1/4 log(4/7)] + 3/4 [1/2 log(8/9) + 1/2 log(8/7)] = 0.0252948
    out = jsd_distill_loss(*_two_token(), beta=0.25)
    want = 0.25 * (0.75 * math.log(4 / 3) + 0.25 * math.log(4 / 7)) + 0.75 * (
        0.5 * math.log(8 / 9) + 0.5 * math.log(8 / 7))
    _allclose(out[0], want)
    s, _, m = _two_token()
    assert abs(float(jsd_distill_loss(s, s, m)[0])) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_jsd_distill_loss_numpy(seed):
    _check_numpy("jsd", seed)
    _check_numpy("jsd", seed + 10, beta=0.8)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), tau=st.sampled_from([1.0, 2.0]))
def test_jsd_distill_loss_property_bounded_nonnegative_zero_iff_equal(s, t, mask, tau):
    _check_nonneg_zero("jsd", s, t, mask)
    for i in range(B):  # per row of one token each: 0 <= JSD <= log 2 tau^2
        one = np.zeros((B, T), np.float32)
        one[i, 0] = 1.0
        v = float(jsd_distill_loss(s * 5, t * 5, one, temperature=tau)[0])
        assert -1e-6 <= v <= math.log(2) * tau**2 + 1e-5


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), k=st.integers(0, B),
       mode=st.sampled_from(MODES))
def test_jsd_distill_loss_property_micro_batched_equals_whole(s, t, mask, k, mode):
    _check_micro_batched("jsd", s, t, mask, k, mode)


@given(s=logits_st, t=logits_st, mask=mask_strategy(B, T), mode=st.sampled_from(MODES),
       seed=st.integers(0, 100))
def test_jsd_distill_loss_property_mask_equals_slice(s, t, mask, mode, seed):
    _check_mask_equals_slice("jsd", s, t, mask, mode, seed)


@given(s=logits_st, t=logits_st, tau=st.sampled_from([0.5, 2.0]),
       beta=st.sampled_from([0.1, 0.5, 0.9]))
def test_jsd_distill_loss_property_temperature_and_beta_symmetry(s, t, tau, beta):
    ones = np.ones((B, T), np.float32)
    _check_temperature("jsd", s, t, ones, tau)
    # JSD_beta(P || Q) = JSD_{1-beta}(Q || P): swapping roles mirrors beta
    _allclose(jsd_distill_loss(s, t, ones, beta=beta)[0],
              jsd_distill_loss(t, s, ones, beta=1 - beta)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        jsd_distill_loss(s, t, ones, beta=1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_jsd_distill_loss_grad_check(seed):
    _check_grads_random("jsd", seed)


def test_jsd_distill_loss_grad_analytic_and_teacher_masked_vocabulary():
    # beta = 0.5, one token: d/ds_v [tau^2 JSD] = tau/2 * q_v (log(q_v/m_v) - KL(Q||M)),
    # Q = student, M = (P + Q)/2 (the P-side terms cancel through d log m).
    r = rng(14)
    tau = 1.5
    s = r.standard_normal((1, 1, 6)).astype(np.float32) * 2
    t = r.standard_normal((1, 1, 6)).astype(np.float32) * 2
    t[..., 4:] = -INF  # teacher masks two entries the student still has mass on
    g = jax.grad(lambda x: jsd_distill_loss(x, t, np.ones((1, 1)), temperature=tau)[0])(s)
    q, p = np.exp(np_log_softmax(s / tau)), np.exp(np_log_softmax(t / tau))
    m = (p + q) / 2
    kl_qm = (q * np.log(q / m)).sum(-1, keepdims=True)
    assert_all_finite(g)
    _allclose(g, tau / 2 * q * (np.log(q / m) - kl_qm), atol=1e-6)
    _check_empty_single_extreme("jsd")


def test_jsd_distill_loss_grad_shared_masked_vocabulary():
    # Student and teacher both mask the same vocabulary entries (e.g. a padded vocabulary);
    # needs ops/kl.py to keep logaddexp away from (-inf, -inf), whose gradient is NaN.
    r = rng(15)
    s, t = r.standard_normal((2, 3, 5)).astype(np.float32), r.standard_normal((2, 3, 5))
    s[..., 3:], t[..., 3:] = -INF, -INF
    t = t.astype(np.float32)
    f = lambda x: jsd_distill_loss(x, t, np.ones((2, 3)))  # noqa: E731
    _allclose(f(s)[0], np_reference("jsd", s, t, np.ones((2, 3)))[0])
    assert_all_finite(jax.grad(lambda x: f(x)[0])(s), "gradient")


def test_distill_losses_table():
    assert DISTILL_LOSSES == LOSSES
    for name, fn in DISTILL_LOSSES.items():
        total, count, metrics = fn(*_two_token(), temperature=1.0, aggregation="token_mean",
                                   max_tokens=None)
        assert set(metrics) == {name} and float(count) == 1.0 and float(total) > 0.03
