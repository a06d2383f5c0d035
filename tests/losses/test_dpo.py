"""Tests of the DPO family (rlhf_jax/losses/dpo.py): hand cases, NumPy loops, properties, grads.

Conventions: a loss returns ``(loss_sum, n_pairs, metrics)``; ``h`` is the log-ratio margin
``(pc - rc) - (pr - rr)``; ``softplus(x) = log(1 + e^x)``, so ``-log sigmoid(x) = softplus(-x)``.
Handy constants: softplus(0) = log 2 = 0.693147, softplus(-1) = 0.313262, softplus(1) = 1.313262.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rlhf_jax.losses import (
    DPO_LOSSES,
    REFERENCE_FREE_LOSSES,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from tests.helpers import (
    EXTREME_LOG_RATIOS,
    assert_all_finite,
    assert_trees_close,
    check_grads,
    float_array_strategy,
    np_sigmoid,
    rng,
)

B = 6  # fixed batch for the property tests (one compile per shape)
NAN, INF = float("nan"), float("inf")

REF_BASED = {"dpo": dpo_loss, "cdpo": cdpo_loss, "robust": robust_dpo_loss, "ipo": ipo_loss}
REF_FREE = {"simpo": simpo_loss, "orpo": orpo_loss}
HPARAMS = {
    "dpo": dict(beta=0.3), "cdpo": dict(beta=0.3, label_smoothing=0.2),
    "robust": dict(beta=0.3, label_smoothing=0.2), "ipo": dict(beta=0.3),
    "simpo": dict(beta=2.0, gamma=0.5), "orpo": dict(lam=0.7),
}
ALL = {**REF_BASED, **REF_FREE}


def _m(out) -> dict[str, float]:
    return {k: float(v) for k, v in compute_metrics(out[2]).items()}


def _allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------- references
def _sp(x: float) -> float:
    """softplus in float64, stable for both signs."""
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def np_reference(name, a, b, c, d, mask, **hp):
    """Plain float64 loop. ``a, b`` policy chosen/rejected; ``c, d`` ref logps or lengths."""
    total, n = 0.0, 0.0
    sums = {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margin": 0.0,
            "rewards/accuracy": 0.0, "nll": 0.0, "log_odds_ratio": 0.0}
    for i in range(len(a)):
        if not mask[i]:
            continue
        pc, pr, x, y = (float(v[i]) for v in (a, b, c, d))
        if name in REF_BASED:
            beta = hp["beta"]
            h = (pc - x) - (pr - y)
            ch, rj = beta * (pc - x), beta * (pr - y)
            e = hp.get("label_smoothing", 0.0)
            if name == "dpo":
                per = _sp(-beta * h)
            elif name == "cdpo":
                per = (1 - e) * _sp(-beta * h) + e * _sp(beta * h)
            elif name == "robust":
                per = ((1 - e) * _sp(-beta * h) - e * _sp(beta * h)) / (1 - 2 * e)
            else:  # ipo
                per = (h - 1.0 / (2.0 * beta)) ** 2
        else:
            ac, ar = pc / max(x, 1.0), pr / max(y, 1.0)
            if name == "simpo":
                ch, rj = hp["beta"] * ac, hp["beta"] * ar
                per = _sp(-(ch - rj - hp["gamma"]))
            else:  # orpo: log odds = log p - log(1 - p), p = exp(avg logp)
                lo = (ac - math.log(-math.expm1(ac))) - (ar - math.log(-math.expm1(ar)))
                per = -ac + hp["lam"] * _sp(-lo)
                ch, rj = hp["lam"] * ac, hp["lam"] * ar
                sums["nll"] += -ac
                sums["log_odds_ratio"] += lo
        total += per
        n += 1
        sums["rewards/chosen"] += ch
        sums["rewards/rejected"] += rj
        sums["rewards/margin"] += ch - rj
        sums["rewards/accuracy"] += float(ch > rj)
    return total, n, {k: v / n if n else 0.0 for k, v in sums.items()}


def _random_inputs(name, r, b=B):
    """Reference-based: sequence logps. Reference-free: logps = length * avg logp, lengths."""
    if name in REF_BASED:
        return [r.uniform(-30, -1, b).astype(np.float32) for _ in range(4)]
    lc, lr = r.integers(1, 9, b).astype(np.float32), r.integers(1, 9, b).astype(np.float32)
    pc = (lc * r.uniform(-4, -0.05, b)).astype(np.float32)
    pr = (lr * r.uniform(-4, -0.05, b)).astype(np.float32)
    return [pc, pr, lc, lr]


# Hypothesis inputs: four [B] float arrays and a [B] 0/1 pair mask.
logps_st = float_array_strategy((4, B), -20.0, -0.125)
pair_mask_st = st.lists(st.integers(0, 1), min_size=B, max_size=B).map(
    lambda x: np.asarray(x, np.float32))
lengths_st = st.lists(st.integers(1, 8), min_size=2 * B, max_size=2 * B).map(
    lambda x: np.asarray(x, np.float32).reshape(2, B))


def _as_inputs(name, x, lengths):
    if name in REF_BASED:
        return list(x)
    avg = x[:2] / 20.0 - 0.01  # average log-probs in (-1.01, -0.016): away from ORPO's clamp
    return [avg[0] * lengths[0], avg[1] * lengths[1], lengths[0], lengths[1]]


# ------------------------------------------------------------------------------- shared checks
def _check_numpy(name, seed):
    r = rng(seed)
    xs = _random_inputs(name, r, b=9)
    mask = (r.random(9) < 0.7).astype(np.float32)
    out = ALL[name](*xs, pair_mask=mask, **HPARAMS[name])
    total, n, metrics = np_reference(name, *xs, mask, **HPARAMS[name])
    _allclose(out[0], total)
    assert float(out[1]) == n
    got = _m(out)
    for k, v in metrics.items():
        if k in got:
            _allclose(got[k], v)


def _check_mask_equals_slice(name, x, lengths, mask):
    """Masked pairs may hold anything (NaN, inf): the result equals the valid slice's."""
    xs = _as_inputs(name, x, lengths)
    junk = [np.where(mask > 0, v, bad).astype(np.float32)
            for v, bad in zip(xs, (NAN, -INF, INF, NAN))]
    out = ALL[name](*junk, pair_mask=mask, **HPARAMS[name])
    keep = mask > 0
    ref = ALL[name](*[v[keep] for v in xs], **HPARAMS[name])
    _allclose(out[0], ref[0])
    assert float(out[1]) == float(ref[1]) == keep.sum()
    assert_trees_close(_m(out), _m(ref), rtol=1e-5, atol=1e-5)
    # ...and the padding pairs get exactly zero (not NaN) gradient.
    grads = jax.grad(lambda a, b: ALL[name](a, b, *junk[2:], pair_mask=mask,
                                            **HPARAMS[name])[0], argnums=(0, 1))(*junk[:2])
    assert_all_finite(grads, "gradient")
    for g in grads:
        assert np.all(np.asarray(g)[~keep] == 0.0)


def _check_micro_batched(name, x, lengths, mask, k):
    """Sums and counts of two micro-batches add up to the whole batch's; metrics merge exactly."""
    xs = _as_inputs(name, x, lengths)
    whole = ALL[name](*xs, pair_mask=mask, **HPARAMS[name])
    a = ALL[name](*[v[:k] for v in xs], pair_mask=mask[:k], **HPARAMS[name])
    b = ALL[name](*[v[k:] for v in xs], pair_mask=mask[k:], **HPARAMS[name])
    _allclose(a[0] + b[0], whole[0])
    assert float(a[1] + b[1]) == float(whole[1])
    assert_trees_close(compute_metrics(merge_metrics(a[2], b[2])), compute_metrics(whole[2]),
                       rtol=1e-5, atol=1e-5)


def _check_grads(name, seed):
    r = rng(seed)
    xs = [jnp.asarray(v, jnp.float32) for v in _random_inputs(name, r, b=5)]
    if name in REF_BASED:  # keep beta*h in a range where float32 finite differences are sharp
        xs = [v / 10.0 for v in xs]
        f = lambda a, b, c, d: ALL[name](a, b, c, d, **HPARAMS[name])[0]  # noqa: E731
        check_grads(f, tuple(xs), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    else:  # lengths are not differentiable inputs
        f = lambda a, b: ALL[name](a, b, xs[2], xs[3], **HPARAMS[name])[0]  # noqa: E731
        check_grads(f, tuple(xs[:2]), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def _check_extremes(name):
    """h (or an average log-prob gap) of +-50, +-100: finite loss and finite gradients."""
    for v in (50.0, -50.0, 100.0, -100.0):
        if name in REF_BASED:
            xs = [jnp.array([v, 0.0, -3.0]), jnp.zeros(3), jnp.zeros(3), jnp.zeros(3)]
        else:
            xs = [jnp.array([-abs(v), -0.5, -3.0]), jnp.array([-0.5, -abs(v), -1.0]),
                  jnp.ones(3), jnp.ones(3)]
        f = lambda a, b: ALL[name](a, b, *xs[2:], **HPARAMS[name])[0]  # noqa: E731
        assert_all_finite(f(*xs[:2]), f"{name} loss at {v}")
        assert_all_finite(jax.grad(f, argnums=(0, 1))(*xs[:2]), f"{name} gradient at {v}")


def _check_empty_and_single(name):
    xs = [jnp.asarray(v) for v in _random_inputs(name, rng(3), b=4)]
    for mask, n in ((np.zeros(4, np.float32), 0), (np.array([0, 0, 1, 0], np.float32), 1)):
        f = lambda a, b: ALL[name](a, b, *xs[2:], pair_mask=mask, **HPARAMS[name])  # noqa: E731
        out = f(*xs[:2])
        assert float(out[1]) == n
        assert_all_finite(out, "loss")
        g = jax.grad(lambda a, b: f(a, b)[0], argnums=(0, 1))(*xs[:2])
        assert_all_finite(g, "gradient")
        if n == 0:
            assert float(out[0]) == 0.0 and all(np.all(np.asarray(x) == 0) for x in g)
            assert all(v == 0.0 for v in _m(out).values())


# ------------------------------------------------------------------------------------------ DPO
HAND = [np.array(v, np.float32) for v in
        ([-1.0, -1.0, -4.0], [-2.0, -3.0, -1.0], [-1.0, -2.0, -2.0], [-2.0, -2.0, -1.0])]
# pc - rc = (0, 1, -2); pr - rr = (0, -1, 0); so h = (0, 2, -2);
# with beta = 0.5, beta h = (0, 1, -1).


def test_dpo_loss_hand_three_pairs():
    out = dpo_loss(*HAND, beta=0.5)
    # softplus(-0) + softplus(-1) + softplus(1) = 0.693147 + 0.313262 + 1.313262 = 2.319671
    _allclose(out[0], 2.319671)
    assert float(out[1]) == 3.0
    m = _m(out)
    # rewards: chosen 0.5 (0, 1, -2) = (0, .5, -1) -> mean -1/6; rejected (0, -.5, 0) -> -1/6
    _allclose(m["rewards/chosen"], -1 / 6)
    _allclose(m["rewards/rejected"], -1 / 6)
    _allclose(m["rewards/margin"], 0.0)  # margins (0, 1, -1)
    _allclose(m["rewards/accuracy"], 1 / 3)  # strictly greater: the tie (pair 0) is not counted


def test_dpo_loss_hand_h_zero_is_log2_and_mask():
    # h = 0 for every pair: loss log 2 per pair, whatever beta.
    z = [np.zeros(2, np.float32), np.full(2, -5.0, np.float32)] * 2
    _allclose(total_of(dpo_loss(*z, beta=3.0)), math.log(2))
    # mask [1, 1, 0] keeps pairs 0 and 1: 0.693147 + 0.313262 = 1.006409, count 2
    out = dpo_loss(*HAND, beta=0.5, pair_mask=np.array([1, 1, 0], np.float32))
    _allclose(out[0], 1.006409)
    assert float(out[1]) == 2.0


def total_of(out):
    return float(out[0]) / float(out[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_numpy(seed):
    _check_numpy("dpo", seed)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st)
def test_dpo_loss_property_mask_equals_slice(x, lengths, mask):
    _check_mask_equals_slice("dpo", x, lengths, mask)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st, k=st.integers(0, B))
def test_dpo_loss_property_micro_batched_equals_whole(x, lengths, mask, k):
    _check_micro_batched("dpo", x, lengths, mask, k)


@given(h=st.lists(st.floats(-60, 60, width=32, allow_subnormal=False), min_size=2, max_size=2))
def test_dpo_loss_property_decreasing_in_h(h):
    lo, hi = sorted(h)
    z = np.zeros(1, np.float32)
    f = lambda v: float(dpo_loss(np.array([v], np.float32), z, z, z, beta=0.5)[0])  # noqa: E731
    assert f(lo) >= f(hi)


@given(x=logps_st)
def test_dpo_loss_property_swap_flips_margin_and_accuracy(x):
    pc, pr, rc, rr = x
    h = (pc.astype(np.float64) - rc) - (pr - rr)
    assume(np.all(np.abs(h) > 1e-2))  # no ties: accuracy(swapped) = 1 - accuracy
    beta = 0.3
    a, b = dpo_loss(pc, pr, rc, rr, beta=beta), dpo_loss(pr, pc, rr, rc, beta=beta)
    ma, mb = _m(a), _m(b)
    _allclose(mb["rewards/margin"], -ma["rewards/margin"], atol=1e-4)
    _allclose(mb["rewards/accuracy"], 1.0 - ma["rewards/accuracy"])
    # softplus(-x) - softplus(x) = -x, so L(h) - L(-h) = -beta * sum(h).
    _allclose(float(a[0]) - float(b[0]), -beta * h.sum(), rtol=1e-4, atol=1e-3)


@given(x=logps_st, shift=st.floats(-10, 10, width=32, allow_subnormal=False))
def test_dpo_loss_property_depends_only_on_log_ratios(x, shift):
    pc, pr, rc, rr = x
    a = dpo_loss(pc, pr, rc, rr, beta=0.2)
    b = dpo_loss(pc + shift, pr, rc + shift, rr, beta=0.2)  # same h, same rewards
    _allclose(a[0], b[0], rtol=1e-4, atol=1e-4)


def test_dpo_loss_property_empty_and_single_masks():
    _check_empty_and_single("dpo")


def test_dpo_loss_property_rejects_bad_beta():
    for beta in (0.0, -0.1, NAN):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(*HAND, beta=beta)


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_grad_check(seed):
    _check_grads("dpo", seed)


def test_dpo_loss_grad_analytic():
    # d/d pc of -log sigmoid(beta h) is -beta sigmoid(-beta h).
    pc, pr, rc, rr = (jnp.asarray(v) for v in _random_inputs("dpo", rng(5), b=7))
    beta = 0.2
    g = jax.grad(lambda a: dpo_loss(a, pr, rc, rr, beta=beta)[0])(pc)
    h = (np.float64(pc) - rc) - (pr - rr)
    _allclose(g, -beta * np_sigmoid(-beta * h))
    # and d/d pr is the opposite.
    g_r = jax.grad(lambda b: dpo_loss(pc, b, rc, rr, beta=beta)[0])(pr)
    _allclose(g_r, beta * np_sigmoid(-beta * h))


def test_dpo_loss_grad_extreme_log_ratios():
    _check_extremes("dpo")
    # h = +-inf in a valid pair: -log sigmoid(beta h) is 0 or +inf (never NaN), and the
    # gradient stays finite (0, resp. -beta): an impossible input is loud, not silently clipped.
    z = jnp.zeros(2)
    for v in EXTREME_LOG_RATIOS[4:]:
        pc = jnp.array([v, 1.0])
        val = float(dpo_loss(pc, z, z, z, beta=0.5)[0])
        # pair 1 (h = 1) adds softplus(-0.5) = 0.474077; pair 0 adds +inf (h = -inf) or 0
        assert val == INF if v < 0 else val == pytest.approx(0.474077, rel=1e-5)
        g = jax.grad(lambda a: dpo_loss(a, z, z, z, beta=0.5)[0])(pc)
        assert_all_finite(g, "gradient")
        _allclose(g[0], -0.5 if v < 0 else 0.0)


# ----------------------------------------------------------------------------------------- cDPO
def test_cdpo_loss_hand():
    # e = 0.25: per = 0.75 softplus(-bh) + 0.25 softplus(bh) with bh = (0, 1, -1):
    # bh=0: log 2 = 0.693147; bh=1: 0.75*0.313262 + 0.25*1.313262 = 0.563262;
    # bh=-1: 0.75*1.313262 + 0.25*0.313262 = 1.063262; sum = 2.319671
    out = cdpo_loss(*HAND, beta=0.5, label_smoothing=0.25)
    _allclose(out[0], 0.693147 + 0.563262 + 1.063262)
    out = cdpo_loss(*HAND, beta=0.5, label_smoothing=0.25, pair_mask=np.array([0, 1, 0]))
    _allclose(out[0], 0.563262)
    assert float(out[1]) == 1.0
    _allclose(_m(out)["rewards/chosen"], 0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cdpo_loss_numpy(seed):
    _check_numpy("cdpo", seed)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st)
def test_cdpo_loss_property_mask_equals_slice(x, lengths, mask):
    _check_mask_equals_slice("cdpo", x, lengths, mask)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st, k=st.integers(0, B))
def test_cdpo_loss_property_micro_batched_equals_whole(x, lengths, mask, k):
    _check_micro_batched("cdpo", x, lengths, mask, k)


@given(x=logps_st, e=st.floats(0.0, 0.5, allow_subnormal=False))
def test_cdpo_loss_property_smoothing_zero_is_dpo_and_mixture(x, e):
    _allclose(cdpo_loss(*x, beta=0.3, label_smoothing=0.0)[0], dpo_loss(*x, beta=0.3)[0])
    # (1 - e) dpo(h) + e dpo(-h), where swapping the pair gives dpo(-h).
    mix = (1 - e) * dpo_loss(*x, beta=0.3)[0] + e * dpo_loss(x[1], x[0], x[3], x[2], beta=0.3)[0]
    _allclose(cdpo_loss(*x, beta=0.3, label_smoothing=e)[0], mix, rtol=1e-5, atol=1e-4)


def test_cdpo_loss_property_edges_and_bad_hyperparameters():
    _check_empty_and_single("cdpo")
    for e in (-0.1, 0.6):
        with pytest.raises(ValueError, match="label_smoothing"):
            cdpo_loss(*HAND, label_smoothing=e)
    with pytest.raises(ValueError, match="beta"):
        cdpo_loss(*HAND, beta=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_cdpo_loss_grad_check(seed):
    _check_grads("cdpo", seed)


def test_cdpo_loss_grad_analytic_and_extremes():
    # d/d pc = beta ( -(1-e) sigmoid(-bh) + e sigmoid(bh) )
    pc, pr, rc, rr = (jnp.asarray(v) for v in _random_inputs("cdpo", rng(6), b=7))
    beta, e = 0.2, 0.1
    g = jax.grad(lambda a: cdpo_loss(a, pr, rc, rr, beta=beta, label_smoothing=e)[0])(pc)
    h = (np.float64(pc) - rc) - (pr - rr)
    _allclose(g, beta * (-(1 - e) * np_sigmoid(-beta * h) + e * np_sigmoid(beta * h)))
    _check_extremes("cdpo")


# --------------------------------------------------------------------------------- robust DPO
def test_robust_dpo_loss_hand():
    # e = 0.25: per = (0.75 softplus(-bh) - 0.25 softplus(bh)) / 0.5, bh = (0, 1, -1):
    # bh=0: 0.5 log2 / 0.5 = 0.693147; bh=1: (0.234946 - 0.328315)/0.5 = -0.186738;
    # bh=-1: (0.984946 - 0.078315)/0.5 = 1.813262.  (Unbounded below: it can be negative.)
    out = robust_dpo_loss(*HAND, beta=0.5, label_smoothing=0.25)
    _allclose(out[0], 0.693147 - 0.186738 + 1.813262)
    assert float(out[1]) == 3.0
    _allclose(_m(out)["rewards/accuracy"], 1 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_robust_dpo_loss_numpy(seed):
    _check_numpy("robust", seed)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st)
def test_robust_dpo_loss_property_mask_equals_slice(x, lengths, mask):
    _check_mask_equals_slice("robust", x, lengths, mask)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st, k=st.integers(0, B))
def test_robust_dpo_loss_property_micro_batched_equals_whole(x, lengths, mask, k):
    _check_micro_batched("robust", x, lengths, mask, k)


@given(x=logps_st, e=st.floats(0.0, 0.45, allow_subnormal=False))
def test_robust_dpo_loss_property_unbiased_under_label_noise(x, e):
    """Chowdhury et al.: the expectation over labels flipped with probability e is DPO."""
    swapped = (x[1], x[0], x[3], x[2])
    noisy = ((1 - e) * robust_dpo_loss(*x, beta=0.3, label_smoothing=e)[0]
             + e * robust_dpo_loss(*swapped, beta=0.3, label_smoothing=e)[0])
    _allclose(noisy, dpo_loss(*x, beta=0.3)[0], rtol=1e-4, atol=1e-3)
    _allclose(robust_dpo_loss(*x, beta=0.3, label_smoothing=0.0)[0], dpo_loss(*x, beta=0.3)[0])


def test_robust_dpo_loss_property_edges_and_bad_hyperparameters():
    _check_empty_and_single("robust")
    for e in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            robust_dpo_loss(*HAND, label_smoothing=e)
    with pytest.raises(ValueError, match="beta"):
        robust_dpo_loss(*HAND, beta=-1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_robust_dpo_loss_grad_check(seed):
    _check_grads("robust", seed)


def test_robust_dpo_loss_grad_analytic_and_extremes():
    # d/d pc = beta (-(1-e) sigmoid(-bh) - e sigmoid(bh)) / (1 - 2e)
    pc, pr, rc, rr = (jnp.asarray(v) for v in _random_inputs("robust", rng(7), b=7))
    beta, e = 0.2, 0.2
    g = jax.grad(lambda a: robust_dpo_loss(a, pr, rc, rr, beta=beta, label_smoothing=e)[0])(pc)
    h = (np.float64(pc) - rc) - (pr - rr)
    want = beta * (-(1 - e) * np_sigmoid(-beta * h) - e * np_sigmoid(beta * h)) / (1 - 2 * e)
    _allclose(g, want)
    _check_extremes("robust")


# ------------------------------------------------------------------------------------------ IPO
def test_ipo_loss_hand():
    # beta = 0.5: 1/(2 beta) = 1; h = (0, 2, -2) -> (0-1)^2 + (2-1)^2 + (-2-1)^2 = 1 + 1 + 9 = 11
    out = ipo_loss(*HAND, beta=0.5)
    _allclose(out[0], 11.0)
    # h = 0 gives 1 / (4 beta^2): beta = 0.1 -> 25
    z = [np.zeros(1, np.float32)] * 4
    _allclose(ipo_loss(*z, beta=0.1)[0], 25.0)
    _allclose(_m(out)["rewards/margin"], 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_loss_numpy(seed):
    _check_numpy("ipo", seed)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st)
def test_ipo_loss_property_mask_equals_slice(x, lengths, mask):
    _check_mask_equals_slice("ipo", x, lengths, mask)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st, k=st.integers(0, B))
def test_ipo_loss_property_micro_batched_equals_whole(x, lengths, mask, k):
    _check_micro_batched("ipo", x, lengths, mask, k)


@given(d=st.floats(-30, 30, width=32, allow_subnormal=False),
       beta=st.sampled_from([0.05, 0.1, 0.5, 2.0]))
def test_ipo_loss_property_minimum_at_target_and_symmetric(d, beta):
    """The loss is 0 at h = 1/(2 beta) and symmetric around it."""
    target = 1.0 / (2.0 * beta)
    z = np.zeros(1, np.float32)
    f = lambda h: float(ipo_loss(np.array([h], np.float32), z, z, z, beta=beta)[0])  # noqa: E731
    assert f(target) == pytest.approx(0.0, abs=1e-10)
    assert f(target + d) == pytest.approx(f(target - d), rel=1e-4, abs=1e-4)
    assert f(target + d) >= 0.0


def test_ipo_loss_property_edges_and_bad_hyperparameters():
    _check_empty_and_single("ipo")
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*HAND, beta=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_ipo_loss_grad_check(seed):
    _check_grads("ipo", seed)


def test_ipo_loss_grad_analytic_and_extremes():
    # d/d pc of (h - 1/(2 beta))^2 is 2 (h - 1/(2 beta))
    pc, pr, rc, rr = (jnp.asarray(v) for v in _random_inputs("ipo", rng(8), b=7))
    g = jax.grad(lambda a: ipo_loss(a, pr, rc, rr, beta=0.25)[0])(pc)
    h = (np.float64(pc) - rc) - (pr - rr)
    _allclose(g, 2.0 * (h - 2.0), rtol=1e-5, atol=1e-4)
    _check_extremes("ipo")


# ---------------------------------------------------------------------------------------- SimPO
SIMPO_HAND = [np.array(v, np.float32) for v in ([-2.0, -3.0], [-6.0, -3.0], [2, 1], [3, 3])]


def test_simpo_loss_hand():
    # beta 2, gamma 0.5. Pair 0: avg (-1, -2) -> rewards (-2, -4); z = -2 + 4 - 0.5 = 1.5,
    # softplus(-1.5) = 0.201413. Pair 1: avg (-3, -1) -> rewards (-6, -2); z = -4.5,
    # softplus(4.5) = 4.511048. Sum 4.712461.
    out = simpo_loss(*SIMPO_HAND, beta=2.0, gamma=0.5)
    _allclose(out[0], 4.712461)
    m = _m(out)
    _allclose(m["rewards/chosen"], -4.0)  # (-2 - 6) / 2
    _allclose(m["rewards/rejected"], -3.0)  # (-4 - 2) / 2
    _allclose(m["rewards/margin"], -1.0)  # (2 - 4) / 2
    _allclose(m["rewards/accuracy"], 0.5)
    # gamma = 0 and equal averages: log 2
    _allclose(simpo_loss(*SIMPO_HAND[:1] * 2, SIMPO_HAND[2], SIMPO_HAND[2], gamma=0.0)[0],
              2 * math.log(2))


@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_loss_numpy(seed):
    _check_numpy("simpo", seed)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st)
def test_simpo_loss_property_mask_equals_slice(x, lengths, mask):
    _check_mask_equals_slice("simpo", x, lengths, mask)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st, k=st.integers(0, B))
def test_simpo_loss_property_micro_batched_equals_whole(x, lengths, mask, k):
    _check_micro_batched("simpo", x, lengths, mask, k)


@given(x=logps_st, lengths=lengths_st, k=st.integers(2, 4))
def test_simpo_loss_property_length_normalised_and_monotone_in_gamma(x, lengths, k):
    pc, pr, lc, lr = _as_inputs("simpo", x, lengths)
    base = simpo_loss(pc, pr, lc, lr)
    # repeating every response k times (k times the log-prob, k times the length) changes nothing
    _allclose(simpo_loss(k * pc, k * pr, k * lc, k * lr)[0], base[0], rtol=1e-5, atol=1e-5)
    # a larger target margin gamma can only raise the loss
    assert float(simpo_loss(pc, pr, lc, lr, gamma=1.5)[0]) >= float(base[0])
    # swapping chosen and rejected flips the margin
    _allclose(_m(simpo_loss(pr, pc, lr, lc))["rewards/margin"], -_m(base)["rewards/margin"])


def test_simpo_loss_property_edges_and_bad_hyperparameters():
    _check_empty_and_single("simpo")
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(*SIMPO_HAND, beta=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_loss_grad_check(seed):
    _check_grads("simpo", seed)


def test_simpo_loss_grad_analytic_and_extremes():
    # d/d pc = -(beta / |y_c|) sigmoid(-(z)),  z = beta (pc/|yc| - pr/|yr|) - gamma
    pc, pr, lc, lr = (jnp.asarray(v) for v in _random_inputs("simpo", rng(9), b=7))
    g = jax.grad(lambda a: simpo_loss(a, pr, lc, lr, beta=2.0, gamma=0.5)[0])(pc)
    z = 2.0 * (np.float64(pc) / lc - np.float64(pr) / lr) - 0.5
    _allclose(g, -(2.0 / np.float64(lc)) * np_sigmoid(-z))
    _check_extremes("simpo")


# ----------------------------------------------------------------------------------------- ORPO
# Chosen: 2 tokens, log-prob 2 log 0.5 -> p = 0.5, odds 1, log odds 0.
# Rejected: 3 tokens, log-prob 3 log 0.2 -> p = 0.2, odds 0.25, log odds = -log 4.
ORPO_HAND = [np.array([2 * math.log(0.5)], np.float32), np.array([3 * math.log(0.2)], np.float32),
             np.array([2.0], np.float32), np.array([3.0], np.float32)]


def test_orpo_loss_hand():
    # log odds ratio = 0 - (-log 4) = log 4 = 1.386294;
    # -log sigmoid(log 4) = log(1 + 1/4) = log 1.25
    # L = nll + lam L_OR = log 2 + 0.5 log 1.25 = 0.693147 + 0.111572 = 0.804719
    out = orpo_loss(*ORPO_HAND, lam=0.5)
    _allclose(out[0], 0.804719)
    m = _m(out)
    _allclose(m["nll"], math.log(2))
    _allclose(m["log_odds_ratio"], math.log(4))
    _allclose(m["odds_ratio_loss"], math.log(1.25))
    _allclose(m["rewards/chosen"], 0.5 * math.log(0.5))  # lam * avg logp = -0.346574
    _allclose(m["rewards/rejected"], 0.5 * math.log(0.2))  # -0.804719
    _allclose(m["rewards/accuracy"], 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_loss_numpy(seed):
    _check_numpy("orpo", seed)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st)
def test_orpo_loss_property_mask_equals_slice(x, lengths, mask):
    _check_mask_equals_slice("orpo", x, lengths, mask)


@given(x=logps_st, lengths=lengths_st, mask=pair_mask_st, k=st.integers(0, B))
def test_orpo_loss_property_micro_batched_equals_whole(x, lengths, mask, k):
    _check_micro_batched("orpo", x, lengths, mask, k)


@given(x=logps_st, lengths=lengths_st)
def test_orpo_loss_property_sft_part_and_antisymmetric_odds(x, lengths):
    pc, pr, lc, lr = _as_inputs("orpo", x, lengths)
    # lam = 0 is pure SFT: the sum of the chosen responses' average NLL.
    _allclose(orpo_loss(pc, pr, lc, lr, lam=0.0)[0], -(pc / lc).sum(), rtol=1e-5, atol=1e-5)
    a, b = _m(orpo_loss(pc, pr, lc, lr)), _m(orpo_loss(pr, pc, lr, lc))
    _allclose(b["log_odds_ratio"], -a["log_odds_ratio"], atol=1e-4)
    _allclose(b["rewards/margin"], -a["rewards/margin"], atol=1e-5)


def test_orpo_loss_property_edges_and_bad_hyperparameters():
    _check_empty_and_single("orpo")
    with pytest.raises(ValueError, match="lam"):
        orpo_loss(*ORPO_HAND, lam=-0.1)


@pytest.mark.parametrize("logp", [-1e-3, -1e-5, -1e-7, 0.0])
def test_orpo_loss_numpy_near_certain_log_odds(logp):
    # Issue 15 item 9.6: the mean log-prob used to be clamped at -1e-6, which shifted the
    # log-odds of near-certain responses by up to ln 10 (13.8155 instead of 16.1181 at -1e-7).
    # float64 reference: a - log(-expm1(a)); a = 0 is clamped to -tiny (log-odds 87.3365).
    pc = np.array([logp], np.float32)
    pr = np.array([-1.0], np.float32)
    one = np.ones(1, np.float32)
    a = min(-float(np.finfo(np.float32).tiny), np.float64(pc[0]))
    want = (a - np.log(-np.expm1(a))) - (-1.0 - np.log(-np.expm1(-1.0)))
    m = _m(orpo_loss(pc, pr, one, one, lam=0.5))
    _allclose(m["log_odds_ratio"], want, rtol=1e-5, atol=0.0)
    g = jax.grad(lambda x: orpo_loss(x, pr, one, one, lam=0.5)[0])(jnp.asarray(pc))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_loss_grad_check(seed):
    _check_grads("orpo", seed)


def test_orpo_loss_grad_analytic():
    # d/d ac [-ac + lam softplus(-lo)], d lo / d ac = 1 + e^a / (1 - e^a) = 1 / (1 - e^a);
    # so d/d pc = (-1 - lam sigmoid(-lo) / (1 - e^ac)) / |y_c|.
    pc, pr, lc, lr = (jnp.asarray(v) for v in _random_inputs("orpo", rng(10), b=7))
    g = jax.grad(lambda a: orpo_loss(a, pr, lc, lr, lam=0.7)[0])(pc)
    ac, ar = np.float64(pc) / lc, np.float64(pr) / lr
    lo = (ac - np.log(-np.expm1(ac))) - (ar - np.log(-np.expm1(ar)))
    _allclose(g, (-1.0 - 0.7 * np_sigmoid(-lo) / -np.expm1(ac)) / lc, rtol=1e-4, atol=1e-5)


def test_orpo_loss_grad_average_logp_zero_and_very_negative():
    """p = 1 (avg log-prob 0) has infinite odds; -1e4 has odds ~ 0: both stay finite."""
    one = jnp.ones(4)
    pc = jnp.array([0.0, -1e4, 0.0, -1e4])
    pr = jnp.array([0.0, 0.0, -1e4, -1e4])
    f = lambda a, b: orpo_loss(a, b, one, one, lam=0.5)[0]  # noqa: E731
    val = f(pc, pr)
    assert_all_finite(val, "loss")
    assert_all_finite(jax.grad(f, argnums=(0, 1))(pc, pr), "gradient")
    # Pair 1: lo ~ -1e4 - 87.3365 (the log odds of p = 1, clamped at -tiny: -log(tiny)),
    # L_OR ~ 1e4 + 87.3365; pairs 0 and 3 tie (lo = 0, L_OR = log 2); pair 2 has lo ~ +1e4
    # (L_OR ~ 0); nll = (0, 1e4, 0, 1e4).
    _allclose(val, 2e4 + 0.5 * (2 * math.log(2) + 1e4 + 87.3365), rtol=1e-5)
    # tiny negative averages (near-certain responses) too
    assert_all_finite(jax.grad(f, argnums=(0, 1))(jnp.full(4, -1e-9), jnp.full(4, -1e-3)))
    _check_extremes("orpo")


def test_orpo_loss_grad_infinite_logps():
    """log-prob -inf: for the rejected response the odds are 0 (finite loss and gradient); for
    the chosen one the NLL is genuinely +inf (reported, not NaN) with a finite gradient."""
    one = jnp.ones(2)
    f = lambda a, b: orpo_loss(a, b, one, one, lam=0.5)[0]  # noqa: E731
    pc, pr = jnp.array([-1.0, -2.0]), jnp.array([-INF, -INF])
    _allclose(f(pc, pr), 3.0)  # nll 1 + 2, L_OR = -log sigmoid(+inf) = 0
    assert_all_finite(jax.grad(f, argnums=(0, 1))(pc, pr), "gradient")
    val = f(pr, pc)
    assert float(val) == INF
    assert_all_finite(jax.grad(f, argnums=(0, 1))(pr, pc), "gradient")


# --------------------------------------------------------------------------------------- tables
def test_loss_tables_have_the_documented_signatures():
    assert DPO_LOSSES == {"sigmoid": dpo_loss, "cdpo": cdpo_loss, "robust": robust_dpo_loss,
                          "ipo": ipo_loss}
    assert REFERENCE_FREE_LOSSES == {"simpo": simpo_loss, "orpo": orpo_loss}
    mask = np.array([1, 1, 0], np.float32)
    for name, fn in DPO_LOSSES.items():
        total, count, metrics = fn(*HAND, beta=0.5, pair_mask=mask)
        assert float(count) == 2.0 and np.isfinite(float(total)), name
        assert {"rewards/chosen", "rewards/rejected", "rewards/margin",
                "rewards/accuracy"} <= set(metrics), name
    lengths = np.array([1.0, 2.0, 3.0], np.float32)
    for name, fn in REFERENCE_FREE_LOSSES.items():
        total, count, metrics = fn(HAND[0], HAND[1], lengths, lengths, pair_mask=mask)
        assert float(count) == 2.0 and np.isfinite(float(total)), name
        # averages: chosen (-1, -0.5), rejected (-2, -1.5): both pairs ranked right
        _allclose(_m((total, count, metrics))["rewards/accuracy"], 1.0)
