"""Tests of ``bradley_terry_loss`` (rlhf_jax/losses/reward_model.py).

Per pair ``l = -log sigmoid(d - margin) + eta (r_c + r_r)^2`` with ``d = r_c - r_r``; returns
``(sum over valid pairs, n valid pairs, metrics)``. ``-log sigmoid(x) = softplus(-x)``:
softplus(0) = log 2 = 0.693147, softplus(-1) = 0.313262, softplus(-0.5) = 0.474077,
softplus(1) = 1.313262.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from tests.helpers import (assert_all_finite, assert_trees_close, check_grads,
                           float_array_strategy, np_sigmoid, rng)

B = 6
NAN, INF = float("nan"), float("inf")


def _allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _m(out) -> dict[str, float]:
    return {k: float(v) for k, v in compute_metrics(out[2]).items()}


@functools.partial(jax.jit, static_argnames=("center_coef",))
def _bt(rc, rr, margin, center_coef, mask):
    return bradley_terry_loss(rc, rr, margin=margin, center_coef=center_coef, pair_mask=mask)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def np_bt(rc, rr, margin, eta, mask):
    """Float64 loop: (sum, count, metric means)."""
    total, n = 0.0, 0.0
    s = {"rewards/accuracy": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
         "rewards/margin": 0.0}
    for i in range(len(rc)):
        if not mask[i]:
            continue
        c, r = float(rc[i]), float(rr[i])
        mg = 0.0 if margin is None else float(margin[i])
        total += _softplus(-(c - r - mg)) + eta * (c + r) ** 2
        n += 1
        s["rewards/accuracy"] += float(c > r)
        s["rewards/chosen"] += c
        s["rewards/rejected"] += r
        s["rewards/margin"] += c - r
    return total, n, {k: v / n if n else 0.0 for k, v in s.items()}


# ----------------------------------------------------------------------------------------- hand
RC = np.array([1.0, 0.0, -1.0], np.float32)
RR = np.array([0.0, 0.0, 0.5], np.float32)
# d = r_c - r_r = (1, 0, -1.5)


def test_bradley_terry_loss_hand_plain():
    out = bradley_terry_loss(RC[:2], RR[:2])
    # softplus(-1) + softplus(0) = 0.313262 + 0.693147 = 1.006409
    _allclose(out[0], 1.006409)
    assert float(out[1]) == 2.0
    m = _m(out)
    _allclose(m["rewards/accuracy"], 0.5)  # the tie d = 0 is not a correct pair (r_c > r_r)
    _allclose(m["rewards/chosen"], 0.5)
    _allclose(m["rewards/rejected"], 0.0)
    _allclose(m["rewards/margin"], 0.5)


def test_bradley_terry_loss_hand_margin_center_mask():
    margin = np.array([0.5, -1.0, 0.0], np.float32)
    # logits d - margin = (0.5, 1, -1.5): softplus(-0.5) + softplus(-1) = 0.474077 + 0.313262
    out = bradley_terry_loss(RC[:2], RR[:2], margin=margin[:2])
    _allclose(out[0], 0.787339)
    # centering eta = 0.1: + 0.1 (1 + 0)^2 + 0.1 (0 + 0)^2 = 0.1
    out = bradley_terry_loss(RC[:2], RR[:2], margin=margin[:2], center_coef=0.1)
    _allclose(out[0], 0.887339)
    # pair_mask (1, 0, 1): pair 0 and pair 2; pair 2: softplus(1.5) + 0.1 (-0.5)^2
    # = 1.701413 + 0.025; total 0.474077 + 0.1 + 1.726413 = 2.300490
    out = bradley_terry_loss(RC, RR, margin=margin, center_coef=0.1,
                             pair_mask=np.array([1, 0, 1], np.float32))
    _allclose(out[0], 2.300490)
    assert float(out[1]) == 2.0
    m = _m(out)
    _allclose(m["rewards/accuracy"], 0.5)  # pair 0 right, pair 2 wrong
    _allclose(m["rewards/margin"], (1.0 - 1.5) / 2)  # the metric margin is d, not d - margin
    _allclose(m["rewards/chosen"], 0.0)
    _allclose(m["rewards/rejected"], 0.25)


# ---------------------------------------------------------------------------------------- numpy
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_margin,eta", [(False, 0.0), (True, 0.0), (True, 0.05)])
def test_bradley_terry_loss_numpy(seed, with_margin, eta):
    r = rng(seed)
    rc, rr = (r.normal(0, 2, 9).astype(np.float32) for _ in range(2))
    margin = r.uniform(0, 1, 9).astype(np.float32) if with_margin else None
    mask = (r.random(9) < 0.7).astype(np.float32)
    out = bradley_terry_loss(rc, rr, margin=margin, center_coef=eta, pair_mask=mask)
    total, n, metrics = np_bt(rc, rr, margin, eta, mask)
    _allclose(out[0], total)
    assert float(out[1]) == n
    got = _m(out)
    for k, v in metrics.items():
        _allclose(got[k], v)


# ------------------------------------------------------------------------------------- property
rewards_st = float_array_strategy((3, B), -8.0, 8.0)  # chosen, rejected, margin
mask_st = st.lists(st.integers(0, 1), min_size=B, max_size=B).map(
    lambda x: np.asarray(x, np.float32))


@given(x=rewards_st)
def test_bradley_terry_loss_property_swap_chosen_rejected(x):
    rc, rr = x[0], x[1]
    assume(np.all(rc != rr))  # no ties: then accuracy(swapped) = 1 - accuracy
    ones = np.ones(B, np.float32)
    a = _bt(rc, rr, None, 0.0, ones)
    b = _bt(rr, rc, None, 0.0, ones)
    d = rc.astype(np.float64) - rr
    _allclose(b[0], sum(_softplus(v) for v in d), rtol=1e-5, atol=1e-4)  # -log sigmoid(-d)
    _allclose(_m(b)["rewards/accuracy"], 1.0 - _m(a)["rewards/accuracy"])
    # softplus(-d) - softplus(d) = -d: the two losses differ by the summed margin
    _allclose(b[0] - a[0], d.sum(), rtol=1e-5, atol=1e-3)


@given(x=rewards_st, delta=st.floats(0.01, 4.0, allow_subnormal=False),
       eta=st.sampled_from([0.0, 0.1]))
def test_bradley_terry_loss_property_decreasing_in_margin(x, delta, eta):
    """Raising r_c and lowering r_r by the same delta keeps r_c + r_r: every pair's loss falls."""
    rc, rr, mg = x
    ones = np.ones(1, np.float32)
    for i in range(B):
        lo = _bt(rc[i:i + 1], rr[i:i + 1], mg[i:i + 1], eta, ones)[0]
        hi = _bt(rc[i:i + 1] + delta, rr[i:i + 1] - delta, mg[i:i + 1], eta, ones)[0]
        # (r_c + d) + (r_r - d) != r_c + r_r in float32, so the centering term may move by a
        # rounding error: allow that much; strictly lower only for the logistic term alone.
        assert float(hi) <= float(lo) * (1 + 1e-5) + 1e-6
        if eta == 0.0 and float(lo) > 1e-3:  # strictly, until float32 underflows the tail
            assert float(hi) < float(lo)


@given(x=rewards_st, mask=mask_st, junk=st.sampled_from([NAN, INF, -INF, 1e30]))
def test_bradley_terry_loss_property_mask_equals_slice(x, mask, junk):
    rc, rr, mg = x
    keep = mask > 0
    dirty = [np.where(keep, v, junk).astype(np.float32) for v in (rc, rr)]
    out = _bt(dirty[0], dirty[1], mg, 0.0, mask)
    ref = bradley_terry_loss(rc[keep], rr[keep], margin=mg[keep])
    _allclose(out[0], ref[0])
    assert float(out[1]) == float(ref[1]) == keep.sum()
    got, want = _m(out), _m(ref)
    for k in want:
        _allclose(got[k], want[k])
    g = _bt_grad(dirty[0], dirty[1], np.where(keep, mg, junk).astype(np.float32), mask)
    assert_all_finite(g, "gradient")
    for v in g:
        assert np.all(np.asarray(v)[~keep] == 0.0)


@jax.jit
def _bt_grad(rc, rr, margin, mask):
    f = lambda a, b: bradley_terry_loss(  # noqa: E731
        a, b, margin=margin, center_coef=0.1, pair_mask=mask)[0]
    return jax.grad(f, argnums=(0, 1))(rc, rr)


@given(x=rewards_st, mask=mask_st, k=st.integers(0, B), eta=st.sampled_from([0.0, 0.1]))
def test_bradley_terry_loss_property_micro_batched_equals_whole(x, mask, k, eta):
    rc, rr, mg = x
    whole = _bt(rc, rr, mg, eta, mask)
    a = bradley_terry_loss(rc[:k], rr[:k], margin=mg[:k], center_coef=eta, pair_mask=mask[:k])
    b = bradley_terry_loss(rc[k:], rr[k:], margin=mg[k:], center_coef=eta, pair_mask=mask[k:])
    _allclose(a[0] + b[0], whole[0], atol=1e-4)
    assert float(a[1] + b[1]) == float(whole[1])
    assert_trees_close(compute_metrics(merge_metrics(a[2], b[2])), compute_metrics(whole[2]),
                       rtol=1e-5, atol=1e-5)


@given(x=rewards_st)
def test_bradley_terry_loss_property_nonnegative_and_log2_at_tie(x):
    rc = x[0]
    out = _bt(rc, rc, None, 0.0, np.ones(B, np.float32))
    _allclose(out[0], B * math.log(2.0))  # d = 0 everywhere: log 2 per pair, accuracy 0
    assert _m(out)["rewards/accuracy"] == 0.0
    assert float(_bt(x[0], x[1], x[2], 0.1, np.ones(B, np.float32))[0]) >= 0.0


def test_bradley_terry_loss_property_empty_and_extreme():
    rc, rr = jnp.array([3.0, -1.0]), jnp.array([0.0, 2.0])
    f = lambda a, b, m: bradley_terry_loss(a, b, pair_mask=m)[0]  # noqa: E731
    empty = jnp.zeros(2)
    out = bradley_terry_loss(rc, rr, pair_mask=empty)
    assert float(out[0]) == 0.0 and float(out[1]) == 0.0
    assert all(v == 0.0 for v in _m(out).values())
    g = jax.grad(f, argnums=(0, 1))(rc, rr, empty)
    assert all(np.all(np.asarray(v) == 0.0) for v in g)
    for v in (50.0, -50.0, 100.0, -100.0):
        a, b = jnp.array([v, 0.0]), jnp.array([0.0, -v])
        ones = jnp.ones(2)
        assert_all_finite(f(a, b, ones), f"loss at {v}")
        assert_all_finite(jax.grad(f, argnums=(0, 1))(a, b, ones), f"gradient at {v}")
    # d = -100: loss ~ 100 per pair (softplus(100)), not inf
    _allclose(f(jnp.array([-100.0]), jnp.array([0.0]), jnp.ones(1)), 100.0)


# ----------------------------------------------------------------------------------------- grad
def test_bradley_terry_loss_grad_analytic():
    """d l / d r_c = -sigmoid(-(d - margin)) + 2 eta (r_c + r_r) = -d l / d r_r + 4 eta (...)."""
    r = rng(4)
    rc, rr = (jnp.asarray(r.normal(0, 2, 7), jnp.float32) for _ in range(2))
    margin = jnp.asarray(r.uniform(0, 1, 7), jnp.float32)
    mask = (r.random(7) < 0.7).astype(np.float32)
    for eta in (0.0, 0.1):
        gc, gr = jax.grad(lambda a, b: bradley_terry_loss(
            a, b, margin=margin, center_coef=eta, pair_mask=mask)[0], argnums=(0, 1))(rc, rr)
        d = np.asarray(rc, np.float64) - np.asarray(rr) - np.asarray(margin)
        s = np.asarray(rc, np.float64) + np.asarray(rr)
        _allclose(gc, mask * (-np_sigmoid(-d) + 2 * eta * s), atol=1e-6)
        _allclose(gr, mask * (np_sigmoid(-d) + 2 * eta * s), atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.1])
def test_bradley_terry_loss_grad_check_grads(eta):
    r = rng(5)
    rc, rr = (jnp.asarray(r.normal(0, 1, 5), jnp.float32) for _ in range(2))
    margin = jnp.asarray(r.uniform(0, 1, 5), jnp.float32)
    mask = jnp.array([1, 1, 0, 1, 1], jnp.float32)
    f = lambda a, b: bradley_terry_loss(  # noqa: E731
        a, b, margin=margin, center_coef=eta, pair_mask=mask)[0]
    check_grads(f, (rc, rr), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_bradley_terry_loss_grad_finite_on_masked_junk():
    """Padding pairs holding inf/NaN rewards get exactly zero, finite gradient."""
    rc = jnp.array([1.0, INF, NAN])
    rr = jnp.array([0.0, -INF, 2.0])
    mask = jnp.array([1.0, 0.0, 0.0])
    g = jax.grad(lambda a, b: bradley_terry_loss(a, b, center_coef=0.1, pair_mask=mask)[0],
                 argnums=(0, 1))(rc, rr)
    assert_all_finite(g, "gradient")
    _allclose(g[0], [-np_sigmoid(-1.0) + 0.2, 0.0, 0.0], atol=1e-6)
