"""Tests of rlhf_jax/ops/stats.py: metric accumulators must not depend on how a batch is split.

Each accumulator is built from a chunk of data here (``_mean_of`` etc.), merged over
micro-batches with ``merge_metrics`` and compared with the whole batch's value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops import ExplainedVariance, Max, Mean, Min, compute_metrics, merge_metrics
from tests.helpers import float_array_strategy, mask_strategy, rng

N = 12  # fixed data size for the property tests


def _mean_of(x, m) -> Mean:
    x, m = jnp.asarray(x, jnp.float32), jnp.asarray(m, jnp.float32)
    return Mean(jnp.sum(jnp.where(m > 0, x, 0.0)), jnp.sum(m))


def _max_of(x, m) -> Max:
    return Max(jnp.max(jnp.where(jnp.asarray(m) > 0, jnp.asarray(x, jnp.float32), -jnp.inf)))


def _min_of(x, m) -> Min:
    return Min(jnp.min(jnp.where(jnp.asarray(m) > 0, jnp.asarray(x, jnp.float32), jnp.inf)))


def _ev_of(y, yhat) -> ExplainedVariance:
    """Moments as the PPO value loss builds them (y = returns, yhat = values), all counted."""
    return ExplainedVariance.of(y, yhat, jnp.ones(np.shape(y), bool))


def _np_ev(y, yhat):
    y, yhat = np.asarray(y, np.float64), np.asarray(yhat, np.float64)
    return 1.0 - np.var(y - yhat) / np.var(y)


def _cuts():
    return st.lists(st.integers(1, N - 1), max_size=3, unique=True).map(sorted)


def _chunks(cuts):
    return list(zip([0] + cuts, cuts + [N]))


# ------------------------------------------------------------------ Mean


def test_Mean_hand():
    # total 3, count 4 -> 0.75; merged with (5, 4): (8, 8) -> 1.0; count 0 -> 0 (not NaN).
    a, b = Mean(jnp.float32(3.0), jnp.float32(4.0)), Mean(jnp.float32(5.0), jnp.float32(4.0))
    assert float(a.compute()) == 0.75
    assert float(a.merge(b).total) == 8.0 and float(a.merge(b).count) == 8.0
    assert float(a.merge(b).compute()) == 1.0
    assert float(Mean(jnp.float32(0.0), jnp.float32(0.0)).compute()) == 0.0


def test_Mean_numpy():
    r = rng(0)
    for _ in range(5):
        x = r.normal(size=30).astype(np.float32)
        m = (r.random(30) < 0.5).astype(np.float32)
        expected = sum(float(v) for v, k in zip(x, m) if k) / max(sum(m), 1)
        np.testing.assert_allclose(float(_mean_of(x, m).compute()), expected, rtol=1e-5, atol=1e-6)


@given(x=float_array_strategy((N,)), m=mask_strategy(1, N), cuts=_cuts())
def test_Mean_property_merge_equals_whole(x, m, cuts):
    m = m[0]
    acc = None
    for lo, hi in _chunks(cuts):
        part = _mean_of(x[lo:hi], m[lo:hi])
        acc = part if acc is None else acc.merge(part)
    whole = _mean_of(x, m)
    assert float(acc.count) == float(whole.count)
    np.testing.assert_allclose(float(acc.compute()), float(whole.compute()), rtol=1e-5, atol=1e-5)
    if m.sum() == 0:
        assert float(acc.compute()) == 0.0


# ------------------------------------------------------------------ Max / Min


def test_Max_hand():
    # max(3, 7) = 7; merging with an empty accumulator (-inf) changes nothing.
    a, b = Max(jnp.float32(3.0)), Max(jnp.float32(7.0))
    assert float(a.merge(b).compute()) == 7.0 and float(b.merge(a).compute()) == 7.0
    assert float(a.merge(Max(jnp.float32(-jnp.inf))).compute()) == 3.0
    # nothing seen at all (an all-masked batch) computes to 0, like an empty Mean
    assert float(Max(jnp.float32(-jnp.inf)).compute()) == 0.0


def test_Min_hand():
    a, b = Min(jnp.float32(3.0)), Min(jnp.float32(7.0))
    assert float(a.merge(b).compute()) == 3.0 and float(b.merge(a).compute()) == 3.0
    assert float(b.merge(Min(jnp.float32(jnp.inf))).compute()) == 7.0
    assert float(Min(jnp.float32(jnp.inf)).compute()) == 0.0


def test_Max_numpy():
    r = rng(1)
    x = r.normal(size=(8, 10)).astype(np.float32)
    acc = Max(jnp.float32(-np.inf))
    for row in x:
        acc = acc.merge(Max(jnp.max(row)))
    assert float(acc.compute()) == float(max(max(row) for row in x))


def test_Min_numpy():
    r = rng(2)
    x = r.normal(size=(8, 10)).astype(np.float32)
    acc = Min(jnp.float32(np.inf))
    for row in x:
        acc = acc.merge(Min(jnp.min(row)))
    assert float(acc.compute()) == float(min(min(row) for row in x))


@given(x=float_array_strategy((N,)), m=mask_strategy(1, N), cuts=_cuts())
def test_Max_property_merge_equals_whole(x, m, cuts):
    m = m[0]
    parts = [_max_of(x[lo:hi], m[lo:hi]) for lo, hi in _chunks(cuts)]
    acc = parts[0]
    for p in parts[1:]:
        acc = acc.merge(p)
    assert float(acc.compute()) == float(_max_of(x, m).compute())  # exact: max is exact


@given(x=float_array_strategy((N,)), m=mask_strategy(1, N), cuts=_cuts())
def test_Min_property_merge_equals_whole(x, m, cuts):
    m = m[0]
    parts = [_min_of(x[lo:hi], m[lo:hi]) for lo, hi in _chunks(cuts)]
    acc = parts[0]
    for p in parts[1:]:
        acc = acc.merge(p)
    assert float(acc.compute()) == float(_min_of(x, m).compute())


# ------------------------------------------------------------------ ExplainedVariance


def test_ExplainedVariance_hand():
    # y = [1, 2, 3, 4] (Var 1.25); yhat = [1, 2, 3, 5] -> e = [0, 0, 0, -1], Var e = 0.1875
    # -> 1 - 0.1875 / 1.25 = 0.85.
    ev = _ev_of([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])
    np.testing.assert_allclose(float(ev.compute()), 0.85, rtol=1e-6)
    # perfect prediction: 1; predicting the mean 2.5: 0; constant y (Var 0): 0 by definition.
    assert float(_ev_of([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]).compute()) == 1.0
    assert float(_ev_of([1.0, 2.0, 3.0, 4.0], [2.5] * 4).compute()) == 0.0
    assert float(_ev_of([3.0, 3.0], [1.0, 5.0]).compute()) == 0.0
    assert float(ExplainedVariance(*[jnp.float32(0.0)] * 5).compute()) == 0.0  # empty
    empty = ExplainedVariance.of(jnp.ones(3), jnp.zeros(3), jnp.zeros(3, bool))
    assert float(empty.merge(empty).compute()) == 0.0 and float(empty.merge(ev).n) == 4
    assert float(empty.merge(ev).compute()) == float(ev.compute())  # the identity


def test_ExplainedVariance_numpy_large_offset_is_stable():
    # Issue 15: returns of 1000 +- 1 (values explain 30% of them). Sums of squares in float32
    # (E[y^2] - E[y]^2) give 0.527 where the float64 answer on the same float32 inputs is 0.507;
    # the moments keep 6 digits, whole or merged from single tokens.
    r = rng(0)
    y = (1000 + r.normal(size=256)).astype(np.float32)
    yhat = (1000 + 0.3 * (y - 1000) + 0.1 * r.normal(size=256)).astype(np.float32)
    want = _np_ev(y, yhat)
    np.testing.assert_allclose(float(_ev_of(y, yhat).compute()), want, rtol=1e-5)
    acc = _ev_of(y[:1], yhat[:1])
    for i in range(1, len(y)):
        acc = acc.merge(_ev_of(y[i:i + 1], yhat[i:i + 1]))
    np.testing.assert_allclose(float(acc.compute()), want, rtol=1e-5)
    naive = lambda x: np.mean(x**2) - np.mean(x) ** 2  # noqa: E731  (float32, the old formula)
    assert abs((1 - naive(y - yhat) / naive(y)) - want) > 1e-2


def test_ExplainedVariance_numpy():
    r = rng(3)
    for _ in range(5):
        y = (r.normal(size=40) + 0.5).astype(np.float32)
        yhat = (y + 0.5 * r.normal(size=40)).astype(np.float32)
        np.testing.assert_allclose(float(_ev_of(y, yhat).compute()), _np_ev(y, yhat),
                                   rtol=1e-4, atol=1e-5)


@given(y=float_array_strategy((N,)), yhat=float_array_strategy((N,)), cuts=_cuts())
def test_ExplainedVariance_property_merge_equals_whole(y, yhat, cuts):
    parts = [_ev_of(y[lo:hi], yhat[lo:hi]) for lo, hi in _chunks(cuts)]
    acc = parts[0]
    for p in parts[1:]:
        acc = acc.merge(p)
    whole = _ev_of(y, yhat)
    assert float(acc.n) == N
    ok = np.var(y.astype(np.float64)) > 1e-2
    got, want = float(acc.compute()), float(whole.compute())
    if ok:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + abs(want)))
        np.testing.assert_allclose(got, _np_ev(y, yhat), rtol=1e-3, atol=1e-3 * (1 + abs(want)))
        assert got <= 1.0 + 1e-6  # explained variance never exceeds 1


# ------------------------------------------------------------------ merge_metrics / compute_metrics


def test_merge_metrics_hand():
    a = {"acc": Mean(jnp.float32(3.0), jnp.float32(4.0)), "hi": Max(jnp.float32(2.0)),
         "lo": Min(jnp.float32(-1.0))}
    b = {"acc": Mean(jnp.float32(1.0), jnp.float32(4.0)), "hi": Max(jnp.float32(5.0)),
         "lo": Min(jnp.float32(0.0))}
    # acc: (3 + 1) / (4 + 4) = 0.5; hi: max(2, 5) = 5; lo: min(-1, 0) = -1
    out = compute_metrics(merge_metrics(a, b))
    assert {k: float(v) for k, v in out.items()} == {"acc": 0.5, "hi": 5.0, "lo": -1.0}


def test_merge_metrics_hand_mismatched_keys_raise():
    a = {"acc": Mean(jnp.float32(1.0), jnp.float32(1.0)), "x": Max(jnp.float32(0.0))}
    b = {"acc": Mean(jnp.float32(1.0), jnp.float32(1.0)), "y": Max(jnp.float32(0.0))}
    with pytest.raises(ValueError, match=r"metric keys differ: \['x', 'y'\]"):
        merge_metrics(a, b)


def _batch_metrics(x, m, y, yhat):
    return {"mean": _mean_of(x, m), "max": _max_of(x, m), "min": _min_of(x, m),
            "ev": _ev_of(y, yhat)}


def test_merge_metrics_numpy():
    r = rng(4)
    x = r.normal(size=(4, 6)).astype(np.float32)
    m = (r.random((4, 6)) < 0.6).astype(np.float32)
    m[0, 0] = 1
    y = r.normal(size=(4, 6)).astype(np.float32)
    yhat = (y + r.normal(size=(4, 6))).astype(np.float32)
    acc = _batch_metrics(x[0], m[0], y[0], yhat[0])
    for i in range(1, 4):
        acc = merge_metrics(acc, _batch_metrics(x[i], m[i], y[i], yhat[i]))
    vals = [float(v) for v, k in zip(x.ravel(), m.ravel()) if k]
    out = {k: float(v) for k, v in compute_metrics(acc).items()}
    np.testing.assert_allclose(out["mean"], sum(vals) / len(vals), rtol=1e-5)
    assert out["max"] == max(vals) and out["min"] == min(vals)
    np.testing.assert_allclose(out["ev"], _np_ev(y.ravel(), yhat.ravel()), rtol=1e-4)


@given(x=float_array_strategy((N,)), m=mask_strategy(1, N), y=float_array_strategy((N,)),
       yhat=float_array_strategy((N,)), cuts=_cuts())
def test_merge_metrics_property_microbatches_equal_whole(x, m, y, yhat, cuts):
    m = m[0]
    acc = None
    for lo, hi in _chunks(cuts):
        part = _batch_metrics(x[lo:hi], m[lo:hi], y[lo:hi], yhat[lo:hi])
        acc = part if acc is None else merge_metrics(acc, part)
    got = compute_metrics(acc)
    want = compute_metrics(_batch_metrics(x, m, y, yhat))
    assert got.keys() == want.keys()
    np.testing.assert_allclose(float(got["mean"]), float(want["mean"]), rtol=1e-5, atol=1e-5)
    assert float(got["max"]) == float(want["max"]) and float(got["min"]) == float(want["min"])
    if np.var(y.astype(np.float64)) > 1e-2:
        w = float(want["ev"])
        np.testing.assert_allclose(float(got["ev"]), w, rtol=1e-4, atol=1e-4 * (1 + abs(w)))


@given(cuts=_cuts())
def test_merge_metrics_property_commutative_and_jittable(cuts):
    x = np.arange(N, dtype=np.float32) - 3.0
    m = np.ones(N, np.float32)
    parts = [_batch_metrics(x[lo:hi], m[lo:hi], x[lo:hi], 0.5 * x[lo:hi])
             for lo, hi in _chunks(cuts)]
    fwd, bwd = parts[0], parts[-1]
    for p in parts[1:]:
        fwd = jax.jit(merge_metrics)(fwd, p)
    for p in parts[-2::-1]:
        bwd = merge_metrics(bwd, p)
    a, b = compute_metrics(fwd), compute_metrics(bwd)
    for k in a:
        np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-6, atol=1e-6)
    # mean of -3..8 is 2.5; max 8, min -3; yhat = y / 2 -> e = y / 2 -> 1 - 1/4 = 0.75
    np.testing.assert_allclose([float(a[k]) for k in ("mean", "max", "min", "ev")],
                               [2.5, 8.0, -3.0, 0.75], rtol=1e-5)


def test_compute_metrics_hand():
    # Mean 6/4 = 1.5; Max 2; Min -2; EV of y = [1, 2, 3, 4], yhat = [1, 2, 3, 5]: 0.85.
    out = compute_metrics({"m": Mean(jnp.float32(6.0), jnp.float32(4.0)),
                           "hi": Max(jnp.float32(2.0)), "lo": Min(jnp.float32(-2.0)),
                           "ev": _ev_of([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 5.0])})
    np.testing.assert_allclose([float(out[k]) for k in ("m", "hi", "lo", "ev")],
                               [1.5, 2.0, -2.0, 0.85], rtol=1e-6)
    assert compute_metrics({}) == {}


def test_compute_metrics_numpy():
    r = rng(5)
    x = r.normal(size=25).astype(np.float32)
    m = (r.random(25) < 0.5).astype(np.float32)
    out = compute_metrics({"mean": _mean_of(x, m), "max": _max_of(x, m)})
    vals = [float(v) for v, k in zip(x, m) if k]
    np.testing.assert_allclose(float(out["mean"]), sum(vals) / len(vals), rtol=1e-5)
    assert float(out["max"]) == max(vals)


@given(x=float_array_strategy((N,)), m=mask_strategy(1, N))
def test_compute_metrics_property_empty_mask_mean_zero_finite(x, m):
    # An all-masked micro-batch gives Mean 0 (not NaN); merging it with data changes nothing.
    empty = {"mean": _mean_of(x, np.zeros(N))}
    assert float(compute_metrics(empty)["mean"]) == 0.0
    data = {"mean": _mean_of(x, m[0])}
    assert float(compute_metrics(merge_metrics(empty, data))["mean"]) == float(
        compute_metrics(data)["mean"])
