"""Tests of KL estimators and exact divergences (rlhf_jax/ops/kl.py).

Estimators take ``logp`` (policy) and ``ref_logp`` of sampled tokens; ``lr = ref_logp - logp``:
k1 = -lr, k2 = lr^2 / 2, k3 = e^lr - 1 - lr. Hand constants for logp = -1, ref = -2 (lr = -1):
k1 = 1, k2 = 0.5, k3 = e^-1 = 0.367879.
Categoricals P = softmax([0, ln 3]) = [1/4, 3/4], Q = softmax([0, 0]) = [1/2, 1/2]:
KL(P||Q) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; KL(Q||P) = 1/2 ln 2 + 1/2 ln(2/3) = 0.143841;
JSD_0.5 with M = [3/8, 5/8]: 1/2 (0.035375 + 0.032269) = 0.033822.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops.kl import (
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    generalized_jsd_from_logits,
    kl_from_logits,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_straight_through,
)
from tests.helpers import (
    EXTREME_LOG_RATIOS,
    assert_all_finite,
    check_grads,
    float_array_strategy,
    np_log_softmax,
    rng,
)

LN3, INF = math.log(3.0), float("inf")
ESTIMATORS = [kl_k1, kl_k2, kl_k3, kl_k3_straight_through]


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def np_estimators(logp, ref):
    """float64 loops: (k1, k2, k3) with the log-ratio clamped to +-LOG_RATIO_CLAMP."""
    k1, k2, k3 = (np.zeros(logp.shape) for _ in range(3))
    for i in np.ndindex(logp.shape):
        lr = min(max(float(ref[i]) - float(logp[i]), -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
        k1[i], k2[i], k3[i] = -lr, 0.5 * lr * lr, math.expm1(lr) - lr
    return k1, k2, k3


def np_kl(p_logits, q_logits, temperature=1.0):
    lp, lq = np_log_softmax(p_logits / temperature), np_log_softmax(q_logits / temperature)
    out = np.zeros(p_logits.shape[:-1])
    for i in np.ndindex(out.shape):
        out[i] = sum(math.exp(a) * (a - b) for a, b in zip(lp[i], lq[i]) if math.exp(a) > 0)
    return out


def np_gjsd(p_logits, q_logits, beta, temperature=1.0):
    lp, lq = np_log_softmax(p_logits / temperature), np_log_softmax(q_logits / temperature)
    out = np.zeros(p_logits.shape[:-1])
    for i in np.ndindex(out.shape):
        p, q = np.exp(lp[i]), np.exp(lq[i])
        m = beta * p + (1 - beta) * q
        kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)
        kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m) if b > 0)
        out[i] = beta * kl_pm + (1 - beta) * kl_qm
    return out


# ------------------------------------------------------------------- per-token estimators: hand
def test_kl_k1_hand():
    _close(kl_k1(jnp.array([-1.0, -2.0, -0.5]), jnp.array([-2.0, -1.0, -0.5])), [1.0, -1.0, 0.0])


def test_kl_k2_hand():
    _close(kl_k2(jnp.array([-1.0, -2.0]), jnp.array([-2.0, -5.0])), [0.5, 4.5])  # 1/2, 9/2


def test_kl_k3_hand():
    # lr = -1: e^-1 - 1 + 1 = 0.367879; lr = 2: e^2 - 3 = 4.389056; lr = 0: 0
    _close(kl_k3(jnp.array([-1.0, -3.0, -1.0]), jnp.array([-2.0, -1.0, -1.0])),
           [0.367879, 4.389056, 0.0])


def test_kl_k3_straight_through_hand():
    logp, ref = jnp.array([-1.0, -3.0]), jnp.array([-2.0, -1.0])
    _close(kl_k3_straight_through(logp, ref), [0.367879, 4.389056])
    # gradient of k2 = lr^2/2 w.r.t. logp is -lr: lr = -1 -> 1, lr = 2 -> -2
    _close(jax.grad(lambda a: kl_k3_straight_through(a, ref).sum())(logp), [1.0, -2.0])


def test_kl_k1_hand_clamp_and_table():
    # lr = 30 is clamped to 20 (the default), or to 5 on request
    _close(kl_k1(jnp.array(-30.0), jnp.array(0.0)), -20.0)
    _close(kl_k2(jnp.array(-30.0), jnp.array(0.0), clamp=5.0), 12.5)
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
                             "k3_st": kl_k3_straight_through}


# ------------------------------------------------------------------ per-token estimators: numpy
def _random_pair(seed, shape=(3, 8), scale=3.0):
    r = rng(seed)
    logp = -np.abs(scale * r.normal(size=shape)).astype(np.float32)
    ref = -np.abs(scale * r.normal(size=shape)).astype(np.float32)
    logp[0, :3] = [-40.0, -0.1, 0.0]  # clamped log-ratios too
    ref[0, :3] = [-0.1, -40.0, 0.0]
    return logp, ref


@pytest.mark.parametrize("k", [0, 1, 2])
def test_kl_k1_numpy_loops(k):
    logp, ref = _random_pair(k)
    _close(kl_k1(logp, ref), np_estimators(logp, ref)[0])


def test_kl_k2_numpy_loops():
    logp, ref = _random_pair(3)
    _close(kl_k2(logp, ref), np_estimators(logp, ref)[1])


def test_kl_k3_numpy_loops():
    logp, ref = _random_pair(4)
    _close(kl_k3(logp, ref), np_estimators(logp, ref)[2], rtol=1e-5, atol=1e-5)


def test_kl_k3_straight_through_numpy_loops():
    logp, ref = _random_pair(5)
    _close(kl_k3_straight_through(logp, ref), np_estimators(logp, ref)[2], rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------- per-token estimators: property
_lp = float_array_strategy((16,), -30.0, 0.0)


@given(_lp, _lp)
def test_kl_k1_property_antisymmetric_zero_on_equal(logp, ref):
    _close(kl_k1(logp, ref), -np.asarray(kl_k1(ref, logp)))
    _close(kl_k1(logp, logp), 0.0, atol=0)


@given(_lp, _lp)
def test_kl_k2_property_nonnegative_symmetric(logp, ref):
    k2 = np.asarray(kl_k2(logp, ref))
    assert np.all(k2 >= 0)
    _close(k2, kl_k2(ref, logp))


@given(_lp, _lp)
def test_kl_k3_property_nonnegative_and_above_k1(logp, ref):
    k3 = np.asarray(kl_k3(logp, ref))
    assert np.all(k3 >= 0.0)
    _close(kl_k3(logp, logp), 0.0, atol=0)
    # e^lr >= 1 + lr  <=>  k3 >= 0; and k3 = k1 + (r - 1) >= k1 - 1 + e^lr > k1 - 1
    assert np.all(k3 >= np.asarray(kl_k1(logp, ref)) - 1.0)


@given(_lp, _lp)
def test_kl_k3_straight_through_property_value_k3_gradient_k2(logp, ref):
    _close(kl_k3_straight_through(logp, ref), kl_k3(logp, ref), rtol=1e-6, atol=1e-5)
    for argnum in (0, 1):
        g_st = jax.grad(lambda a, b: kl_k3_straight_through(a, b).sum(), argnum)(logp, ref)
        g_k2 = jax.grad(lambda a, b: kl_k2(a, b).sum(), argnum)(logp, ref)
        _close(g_st, g_k2, atol=0, rtol=0)


def _categoricals(seed):
    r = rng(seed)
    return (np_log_softmax(r.uniform(-1.5, 1.5, 5)).astype(np.float32),
            np_log_softmax(r.uniform(-1.5, 1.5, 5)).astype(np.float32))


@given(st.integers(0, 10_000))
def test_kl_k1_property_unbiased_monte_carlo(seed):
    """E_{y ~ p}[k1] = E_{y ~ p}[k3] = KL(p || q), for two small categoricals."""
    lp, lq = _categoricals(seed)
    exact = float(np.sum(np.exp(lp.astype(np.float64)) * (lp - lq)))
    y = rng(seed + 1).choice(5, size=200_000, p=np.exp(lp.astype(np.float64)) /
                             np.exp(lp.astype(np.float64)).sum())
    for est in (kl_k1, kl_k3, kl_k3_straight_through):
        k = np.asarray(est(lp[y], lq[y]), np.float64)
        se = k.std() / math.sqrt(len(k))
        assert abs(k.mean() - exact) < 5 * se + 1e-4, (est.__name__, k.mean(), exact, se)


def test_kl_k3_property_unbiased_exact_expectation():
    # exact expectations (no sampling): sum_y p(y) k(y) == KL(p||q) for k1 and k3, not for k2
    for seed in range(5):
        lp, lq = _categoricals(seed)
        p = np.exp(lp.astype(np.float64))
        exact = float(np.sum(p * (lp - lq)))
        _close(np.sum(p * np.asarray(kl_k1(lp, lq))), exact, atol=1e-6)
        _close(np.sum(p * np.asarray(kl_k3(lp, lq))), exact, atol=1e-6)


@pytest.mark.parametrize("lr", EXTREME_LOG_RATIOS)
@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda f: f.__name__)
def test_kl_k3_property_extreme_log_ratios_finite(est, lr):
    # ref = logp + lr for finite logp; inf log-ratios come from -inf log-probs
    if math.isinf(lr):
        logp, ref = (jnp.array(-5.0), jnp.array(lr)) if lr < 0 else (jnp.array(-lr), jnp.array(-5.))
    else:
        logp, ref = jnp.array(-150.0), jnp.array(-150.0 + lr)
    val, grads = jax.value_and_grad(lambda a, b: est(a, b), argnums=(0, 1))(logp, ref)
    assert_all_finite((val, grads), f"{est.__name__} value/gradient at lr={lr}")
    clamped = max(min(lr, LOG_RATIO_CLAMP), -LOG_RATIO_CLAMP)
    expected = {kl_k1: -clamped, kl_k2: 0.5 * clamped ** 2,
                kl_k3: math.expm1(clamped) - clamped,
                kl_k3_straight_through: math.expm1(clamped) - clamped}[est]
    _close(val, expected, rtol=1e-6)
    assert float(val) >= 0.0 or est is kl_k1


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda f: f.__name__)
def test_kl_k1_property_both_minus_inf_is_zero(est):
    # a token with log-prob -inf under both (a masked vocabulary entry): 0, finite gradient
    val, g = jax.value_and_grad(lambda a: est(a, jnp.array(-INF)))(jnp.array(-INF))
    assert float(val) == 0.0
    assert_all_finite(g, "gradient")


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda f: f.__name__)
def test_kl_k1_property_nan_propagates_unless_masked(est):
    # Issue 15 item 9.5: a NaN log-ratio used to become 0 silently. Unmasked it must come out
    # as NaN (the trainer's non-finite guard then skips the step); masked it gives 0 with finite
    # values and gradients (double where), and the other positions are untouched (float64 ref).
    logp = jnp.array([-1.0, float("nan"), -0.5])
    ref = jnp.array([-2.0, -1.0, -0.25])
    assert np.isnan(np.asarray(est(logp, ref))[1])
    mask = jnp.array([1.0, 0.0, 1.0])
    lr = np.array([-1.0, 0.0, 0.25])  # float64 log r, 0 where masked
    want = {kl_k1: -lr, kl_k2: 0.5 * lr**2, kl_k3: np.expm1(lr) - lr,
            kl_k3_straight_through: np.expm1(lr) - lr}[est]
    f = lambda a, b: jnp.sum(jnp.where(mask > 0, est(a, b, mask=mask), 0.0))  # noqa: E731
    val, grads = jax.value_and_grad(f, argnums=(0, 1))(logp, ref)
    assert_all_finite((val, grads), f"{est.__name__} with a masked NaN")
    _close(est(logp, ref, mask=mask), want, rtol=1e-6, atol=1e-7)
    assert float(grads[0][1]) == 0.0 and float(grads[1][1]) == 0.0


# ------------------------------------------------------------------- per-token estimators: grad
def _grad_inputs(seed=7):
    r = rng(seed)
    return (-np.abs(r.normal(size=(6,))) - 0.1).astype(np.float32), \
           (-np.abs(r.normal(size=(6,))) - 0.1).astype(np.float32)


def test_kl_k1_grad():
    logp, ref = _grad_inputs()
    check_grads(kl_k1, (logp, ref), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    _close(jax.grad(lambda a: kl_k1(a, ref).sum())(logp), np.ones(6))  # d k1 / d logp = 1


def test_kl_k2_grad():
    logp, ref = _grad_inputs()
    check_grads(kl_k2, (logp, ref), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    _close(jax.grad(lambda a: kl_k2(a, ref).sum())(logp), -(ref - logp))  # d k2 / d logp = -lr


def test_kl_k3_grad():
    logp, ref = _grad_inputs()
    check_grads(kl_k3, (logp, ref), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    lr = ref.astype(np.float64) - logp
    _close(jax.grad(lambda a: kl_k3(a, ref).sum())(logp), 1.0 - np.exp(lr))  # 1 - r


def test_kl_k3_straight_through_grad():
    logp, ref = _grad_inputs()
    g = jax.grad(lambda a: kl_k3_straight_through(a, ref).sum())(logp)
    _close(g, logp - ref)  # the gradient of k2
    check_grads(lambda a, b: kl_k2(a, b), (logp, ref), order=1, modes=["rev"], eps=1e-3,
                atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("lr", EXTREME_LOG_RATIOS)
def test_kl_k3_grad_extreme_log_ratios_vectorised(lr):
    logp = jnp.array([-1.0, -200.0, -3.0])
    ref = logp + jnp.array([0.0, lr, 1.0])
    for est in ESTIMATORS:
        g = jax.grad(lambda a, b: est(a, b).sum(), argnums=(0, 1))(logp, ref)
        assert_all_finite(g, f"{est.__name__} gradient at lr={lr}")


# ------------------------------------------------------------------------------ kl_from_logits
def test_kl_from_logits_hand():
    p = jnp.array([[[0.0, LN3]]])
    q = jnp.array([[[0.0, 0.0]]])
    _close(kl_from_logits(p, q), [[0.130812]])  # forward KL(P||Q)
    _close(kl_from_logits(q, p), [[0.143841]])  # reverse KL(Q||P)
    _close(kl_from_logits(2 * p, 2 * q, temperature=2.0), [[0.130812]])
    # P = [1, 0] (a -inf logit): KL(P||Q) = ln 2 = 0.693147; shared -inf entries change nothing
    _close(kl_from_logits(jnp.array([[[0.0, -INF]]]), q), [[0.693147]])
    _close(kl_from_logits(jnp.array([[[0.0, LN3, -INF]]]), jnp.array([[[0.0, 0.0, -INF]]])),
           [[0.130812]])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_kl_from_logits_numpy_loops(temperature):
    r = rng(11)
    p, q = (2 * r.normal(size=(2, 3, 7))).astype(np.float32), \
        (2 * r.normal(size=(2, 3, 7))).astype(np.float32)
    _close(kl_from_logits(p, q, temperature=temperature), np_kl(p, q, temperature))
    _close(kl_from_logits(q, p, temperature=temperature), np_kl(q, p, temperature))


_logits = float_array_strategy((2, 3, 6), -8.0, 8.0)


@given(_logits, _logits, st.floats(-20, 20, allow_subnormal=False))
def test_kl_from_logits_property_nonnegative_zero_iff_equal(p, q, c):
    kl = np.asarray(kl_from_logits(p, q))
    assert np.all(kl >= -1e-6)
    assert np.all(np.asarray(kl_from_logits(p, p)) == 0.0)
    _close(kl_from_logits(p + np.float32(c), q), kl, atol=1e-4)  # shift invariant
    # strictly positive where the distributions differ
    dp = np.abs(np.exp(np_log_softmax(p)) - np.exp(np_log_softmax(q))).max(-1)
    assert np.all(kl[dp > 1e-2] > 0)
    # Pinsker: KL >= 2 TV^2
    tv = 0.5 * np.abs(np.exp(np_log_softmax(p)) - np.exp(np_log_softmax(q))).sum(-1)
    assert np.all(kl >= 2 * tv ** 2 - 1e-5)


def test_kl_from_logits_grad():
    r = rng(12)
    p, q = r.normal(size=(2, 2, 5)).astype(np.float32), r.normal(size=(2, 2, 5)).astype(np.float32)
    check_grads(lambda a, b: kl_from_logits(a, b, temperature=0.8), (p, q), order=1,
                modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # d KL(P||Q) / d q_logits = Q - P
    g = jax.grad(lambda b: kl_from_logits(p, b).sum())(q)
    _close(g, np.exp(np_log_softmax(q)) - np.exp(np_log_softmax(p)))


def test_kl_from_logits_grad_finite_with_minus_inf_vocab():
    p = jnp.array([[[0.0, LN3, -INF, 1.0], [0.0, -INF, -INF, 2.0]]])
    q = jnp.array([[[0.0, 0.0, -INF, -1.0], [1.0, 0.5, -INF, 0.0]]])
    for a, b in ((p, q), (q[:, :1], p[:, :1])):
        val, g = jax.value_and_grad(lambda x, y: kl_from_logits(x, y).sum(), (0, 1))(a, b)
        assert_all_finite((val, g), "value/gradient")
    val = kl_from_logits(p, q)
    ref = np_kl(np.array([[[0.0, LN3, 1.0], [0.0, -1e30, 2.0]]]),
                np.array([[[0.0, 0.0, -1.0], [1.0, 0.5, 0.0]]]))
    _close(val, ref)


# ----------------------------------------------------------------- generalized_jsd_from_logits
def test_generalized_jsd_from_logits_hand():
    p = jnp.array([[[0.0, LN3]]])
    q = jnp.array([[[0.0, 0.0]]])
    _close(generalized_jsd_from_logits(p, q), [[0.033822]])
    # beta = 1/4: M = [7/16, 9/16]; 1/4 KL(P||M) + 3/4 KL(Q||M) = 0.024870
    _close(generalized_jsd_from_logits(p, q, beta=0.25), [[0.024870]])
    # disjoint supports: JSD = ln 2 = 0.693147
    _close(generalized_jsd_from_logits(jnp.array([[[0.0, -INF]]]), jnp.array([[[-INF, 0.0]]])),
           [[0.693147]])


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_generalized_jsd_from_logits_hand_invalid_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_from_logits(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), beta=beta)


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.9])
def test_generalized_jsd_from_logits_numpy_loops(beta):
    r = rng(13)
    p, q = (2 * r.normal(size=(2, 3, 7))).astype(np.float32), \
        (2 * r.normal(size=(2, 3, 7))).astype(np.float32)
    _close(generalized_jsd_from_logits(p, q, beta=beta), np_gjsd(p, q, beta))
    _close(generalized_jsd_from_logits(p, q, beta=beta, temperature=1.7),
           np_gjsd(p, q, beta, temperature=1.7))


@given(_logits, _logits, st.floats(0.05, 0.95, allow_subnormal=False))
def test_generalized_jsd_from_logits_property_bounds_symmetry(p, q, beta):
    j = np.asarray(generalized_jsd_from_logits(p, q, beta=beta))
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # binary entropy of beta
    assert np.all(j >= -1e-6) and np.all(j <= bound + 1e-5)
    _close(generalized_jsd_from_logits(q, p, beta=1 - beta), j, atol=1e-5)
    _close(generalized_jsd_from_logits(p, p, beta=beta), 0.0, atol=1e-6)  # log M rounds
    half = np.asarray(generalized_jsd_from_logits(p, q))  # standard JSD from KLs to the mixture
    assert np.all(half <= math.log(2) + 1e-5)
    pp, qq = np.exp(np_log_softmax(p)), np.exp(np_log_softmax(q))
    lm = np.log(0.5 * pp + 0.5 * qq)
    std = 0.5 * (pp * (np.log(pp) - lm)).sum(-1) + 0.5 * (qq * (np.log(qq) - lm)).sum(-1)
    _close(half, std, atol=1e-5)


def test_generalized_jsd_from_logits_grad():
    r = rng(14)
    p, q = r.normal(size=(2, 2, 5)).astype(np.float32), r.normal(size=(2, 2, 5)).astype(np.float32)
    for beta in (0.5, 0.2):
        check_grads(lambda a, b: generalized_jsd_from_logits(a, b, beta=beta), (p, q), order=1,
                    modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_generalized_jsd_from_logits_grad_finite_with_minus_inf_vocab():
    p = jnp.array([[[0.0, LN3, -INF, 1.0], [0.0, -INF, -INF, 2.0]]])
    q = jnp.array([[[0.0, 0.0, -INF, -1.0], [-INF, 0.5, -INF, 0.0]]])
    val, g = jax.value_and_grad(
        lambda x, y: generalized_jsd_from_logits(x, y, beta=0.3).sum(), (0, 1))(p, q)
    assert_all_finite((val, g), "value/gradient")
    ref = np_gjsd(np.array([[[0.0, LN3, 1.0], [0.0, -1e30, 2.0]]]),
                  np.array([[[0.0, 0.0, -1.0], [-1e30, 0.5, 0.0]]]), 0.3)
    _close(generalized_jsd_from_logits(p, q, beta=0.3), ref)
