"""Tests of masked reductions (rlhf_jax/ops/masked.py): hand cases, NumPy loops, properties, grads.

Promises held here (RELIABILITY.md): values and gradients stay finite for masks with 0 and 1 valid
entries, even when the masked entries hold inf or NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rlhf_jax.ops.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten
from tests.helpers import (
    assert_all_finite,
    check_grads,
    float_array_strategy,
    mask_strategy,
    random_mask,
    rng,
)

NAN, INF = float("nan"), float("inf")
B, T = 4, 6


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _garbage(x, m, fill):
    """``x`` with its masked entries replaced by ``fill`` (inf / NaN must not leak)."""
    return np.where(m > 0, x, np.float32(fill)).astype(np.float32)


# ------------------------------------------------------------------------- NumPy loop references
def _np_reduce(x, m, axis, fn):
    """Apply ``fn(list of valid values)`` along ``axis`` (None or an int) of a 2-D array."""
    if axis is None:
        return fn([float(v) for v, k in zip(x.ravel(), m.ravel()) if k])
    xs, ms = (x, m) if axis == 1 else (x.T, m.T)
    return np.array([fn([float(v) for v, k in zip(xr, mr) if k]) for xr, mr in zip(xs, ms)])


def _np_mean(vals):
    return sum(vals) / len(vals) if vals else 0.0


def _np_var(vals, unbiased=True):
    n = len(vals)
    if n - (1 if unbiased else 0) <= 0:
        return 0.0
    mu = sum(vals) / n
    return sum((v - mu) ** 2 for v in vals) / (n - 1 if unbiased else n)


# -------------------------------------------------------------------------------- masked_sum
def test_masked_sum_hand():
    # 1 + 2 = 3; the masked inf and NaN contribute exactly 0. Row sums: [1, 2+4=6].
    x = jnp.array([[1.0, INF, NAN], [2.0, 4.0, -INF]])
    m = jnp.array([[1, 0, 0], [1, 1, 0]])
    _close(masked_sum(x, m), 7.0)
    _close(masked_sum(x, m, axis=1), [1.0, 6.0])
    _close(masked_sum(x, m, axis=0), [3.0, 4.0, 0.0])


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_masked_sum_numpy_loops(axis):
    r = rng(0)
    x = r.normal(size=(B, T)).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    _close(masked_sum(x, m, axis=axis), _np_reduce(x, m, axis, sum))


@given(float_array_strategy((B, T)), mask_strategy(B, T), st.sampled_from([INF, -INF, NAN]))
def test_masked_sum_property_mask_equals_slice_and_microbatch(x, m, fill):
    whole = masked_sum(_garbage(x, m, fill), m)
    _close(whole, x[m > 0].astype(np.float64).sum(), atol=1e-4)
    halves = masked_sum(x[:2], m[:2]) + masked_sum(x[2:], m[2:])  # micro-batched equals whole
    _close(halves, whole, atol=1e-4)


def test_masked_sum_grad():
    r = rng(1)
    x = r.normal(size=(B, T)).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    check_grads(lambda a: masked_sum(a, m, axis=1), (x,), order=1, modes=["rev"], eps=1e-3,
                atol=1e-2, rtol=1e-2)
    g = jax.grad(lambda a: masked_sum(a, m))(_garbage(x, m, INF))  # d/dx = mask, even at inf
    _close(g, m)


# ------------------------------------------------------------------------------ masked_count
def test_masked_count_hand():
    m = jnp.array([[1, 0, 0], [1, 1, 0]])
    _close(masked_count(m), 3.0)
    _close(masked_count(m, axis=1), [1.0, 2.0])
    _close(masked_count(jnp.array([[True, False, True]]), axis=0), [1.0, 0.0, 1.0])
    assert masked_count(m).dtype == jnp.float32


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_masked_count_numpy_loops(axis):
    m = random_mask(rng(2), B, T, empty_rows=1)
    _close(masked_count(m, axis=axis), _np_reduce(m, m, axis, len))


@given(mask_strategy(B, T))
def test_masked_count_property_microbatch_and_dtypes(m):
    total = masked_count(m)
    _close(total, m.sum())
    _close(masked_count(m[:1]) + masked_count(m[1:]), total)
    _close(masked_count(m.astype(bool)), total)
    _close(masked_count(m.astype(np.int32), axis=1), m.sum(1))


# ------------------------------------------------------------------------------- masked_mean
def test_masked_mean_hand():
    # (1 + 3) / 2 = 2; an empty row gives 0; a row with one valid entry gives that entry.
    x = jnp.array([[1.0, 3.0, 100.0], [NAN, INF, 5.0], [7.0, 8.0, 9.0]])
    m = jnp.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]])
    _close(masked_mean(x, m, axis=1), [2.0, 0.0, 8.0])
    _close(masked_mean(x, m), (1 + 3 + 8) / 3)  # = 4


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_masked_mean_numpy_loops(axis):
    r = rng(3)
    x = r.normal(size=(B, T)).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    _close(masked_mean(x, m, axis=axis), _np_reduce(x, m, axis, _np_mean))


@given(float_array_strategy((B, T)), mask_strategy(B, T), st.sampled_from([INF, NAN]))
def test_masked_mean_property_slice_microbatch_shuffle(x, m, fill):
    out = masked_mean(_garbage(x, m, fill), m)
    _close(out, _np_mean(list(x[m > 0].astype(np.float64))), atol=1e-5)
    # micro-batched: add sums and counts, divide once
    s = masked_sum(x[:2], m[:2]) + masked_sum(x[2:], m[2:])
    n = masked_count(m[:2]) + masked_count(m[2:])
    _close(s / jnp.maximum(n, 1.0), out, atol=1e-5)
    perm = rng(4).permutation(B * T)  # shuffling the (value, mask) pairs changes nothing
    _close(masked_mean(x.ravel()[perm], m.ravel()[perm]), out, atol=1e-5)


def test_masked_mean_grad():
    r = rng(5)
    x = r.normal(size=(B, T)).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    check_grads(lambda a: masked_mean(a, m, axis=1), (x,), order=1, modes=["rev"], eps=1e-3,
                atol=1e-2, rtol=1e-2)
    g = jax.grad(lambda a: masked_mean(a, m))(_garbage(x, m, NAN))
    _close(g, m / m.sum())  # d mean / dx = mask / n


# -------------------------------------------------------------------------------- masked_var
def test_masked_var_hand():
    # valid [1, 3, 5]: mean 3, squared deviations 4 + 0 + 4 = 8: unbiased 8/2 = 4, biased 8/3.
    x = jnp.array([[1.0, 3.0, 5.0, NAN], [2.0, INF, 0.0, 0.0], [4.0, 6.0, 0.0, 0.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    # row 1 has one entry: 0 either way; row 2 [4, 6]: mean 5, deviations 1 + 1 = 2: 2/1 or 2/2.
    _close(masked_var(x, m, axis=1), [4.0, 0.0, 2.0])
    _close(masked_var(x, m, axis=1, unbiased=False), [8.0 / 3.0, 0.0, 1.0])
    # whole array [1, 3, 5, 2, 4, 6]: mean 3.5, deviations 6.25+0.25+2.25+2.25+0.25+6.25 = 17.5
    _close(masked_var(x, m), 17.5 / 5)
    _close(masked_var(x, jnp.zeros_like(m)), 0.0)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_masked_var_numpy_loops(axis, unbiased):
    r = rng(6)
    x = (3 * r.normal(size=(B, T)) + 2).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    ref = _np_reduce(x, m, 1 if axis == -1 else axis, lambda v: _np_var(v, unbiased))
    _close(masked_var(_garbage(x, m, NAN), m, axis=axis, unbiased=unbiased), ref)


def test_masked_var_numpy_tuple_axis_3d():
    r = rng(7)
    x = r.normal(size=(2, 3, 4)).astype(np.float32)
    m = (r.random((2, 3, 4)) < 0.6).astype(np.float32)
    out = masked_var(x, m, axis=(1, 2))
    ref = [_np_var([float(v) for v, k in zip(x[i].ravel(), m[i].ravel()) if k]) for i in range(2)]
    _close(out, ref)


@given(float_array_strategy((B, T)), mask_strategy(B, T), st.floats(-50, 50, allow_subnormal=False),
       st.floats(0.1, 4, allow_subnormal=False))
def test_masked_var_property_slice_shift_scale(x, m, c, a):
    v = masked_var(_garbage(x, m, INF), m)
    _close(v, _np_var(list(x[m > 0].astype(np.float64))), rtol=1e-4, atol=1e-4)
    assert float(v) >= 0.0
    _close(masked_var(x + np.float32(c), m), v, rtol=1e-3, atol=1e-3)  # shift invariant
    _close(masked_var(np.float32(a) * x, m), a * a * v, rtol=1e-4, atol=1e-4)
    n = m.sum()  # biased = unbiased * (n - 1) / n
    if n >= 2:
        _close(masked_var(x, m, unbiased=False), v * (n - 1) / n, rtol=1e-4, atol=1e-5)


def test_masked_var_grad():
    r = rng(8)
    x = r.normal(size=(B, T)).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    for unbiased in (True, False):
        check_grads(lambda a: masked_var(a, m, axis=1, unbiased=unbiased), (x,), order=1,
                    modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # d var / dx = 2 m (x - mean) / (n - 1)
    n = m.sum()
    mean = (x * m).sum() / n
    g = jax.grad(lambda a: masked_var(a, m))(_garbage(x, m, NAN))
    _close(g, 2 * m * (x - mean) / (n - 1))


@pytest.mark.parametrize("fill", [INF, -INF, NAN])
@pytest.mark.parametrize("n_valid", [0, 1])
def test_masked_var_grad_finite_for_empty_and_single_masks(n_valid, fill):
    m = np.zeros((1, 5), np.float32)
    m[0, :n_valid] = 1
    x = _garbage(np.full((1, 5), 2.5, np.float32), m, fill)
    for f in (masked_sum, masked_mean, masked_var,
              lambda a, k: masked_var(a, k, unbiased=False),
              lambda a, k: masked_var(a, k, axis=1), masked_whiten):
        val, g = jax.value_and_grad(lambda a: jnp.sum(f(a, m)))(x)
        assert_all_finite((val, g), "value/gradient")
        _close(g * (1 - m), 0.0)  # masked entries get exactly zero gradient


# ---------------------------------------------------------------------------- masked_whiten
def test_masked_whiten_hand():
    # valid [1, 3, 5]: mean 3, unbiased var 4, std 2 -> [-1, 0, 1]; masked entries -> 0.
    x = jnp.array([1.0, 3.0, NAN, 5.0])
    m = jnp.array([1, 1, 0, 1])
    _close(masked_whiten(x, m), [-1.0, 0.0, 0.0, 1.0])
    _close(masked_whiten(x, m, shift_mean=False), [2.0, 3.0, 0.0, 4.0])  # mean added back
    # biased var 8/3: std 1.632993 -> [-1.224745, 0, 1.224745]
    _close(masked_whiten(x, m, unbiased=False), [-1.224745, 0.0, 0.0, 1.224745])


def test_masked_whiten_hand_single_and_empty():
    # one valid entry: var 0, x - mean = 0 -> 0 (shift_mean=False: the entry itself).
    x = jnp.array([4.0, INF, NAN])
    m = jnp.array([1, 0, 0])
    _close(masked_whiten(x, m), [0.0, 0.0, 0.0])
    _close(masked_whiten(x, m, shift_mean=False), [4.0, 0.0, 0.0])
    _close(masked_whiten(x, jnp.zeros(3)), [0.0, 0.0, 0.0])


def _np_whiten(x, m, shift_mean=True, eps=1e-8, unbiased=True):
    vals = [float(v) for v, k in zip(x.ravel(), m.ravel()) if k]
    mu, var = _np_mean(vals), _np_var(vals, unbiased)
    out = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
        if m[idx]:
            out[idx] = (float(x[idx]) - mu) / np.sqrt(var + eps) + (0.0 if shift_mean else mu)
    return out


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_numpy_loops(shift_mean, unbiased):
    r = rng(9)
    x = (2 * r.normal(size=(B, T)) + 1).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    out = masked_whiten(_garbage(x, m, NAN), m, shift_mean=shift_mean, unbiased=unbiased)
    _close(out, _np_whiten(x, m, shift_mean, unbiased=unbiased), rtol=1e-4, atol=1e-5)


@given(float_array_strategy((B, T)), mask_strategy(B, T), st.sampled_from([INF, NAN]))
def test_masked_whiten_property_standardised(x, m, fill):
    n = int(m.sum())
    xs = x[m > 0].astype(np.float64)
    assume(n >= 2 and xs.std() > 1e-2)
    out = np.asarray(masked_whiten(_garbage(x, m, fill), m), np.float64)
    assert np.all(out[m == 0] == 0.0)
    _close(out[m > 0].mean(), 0.0, atol=1e-4)
    _close(out[m > 0].var(ddof=1), 1.0, rtol=1e-3)
    # shift_mean=False keeps the mean: the valid entries' mean equals the original mean
    kept = np.asarray(masked_whiten(x, m, shift_mean=False), np.float64)
    _close(kept[m > 0].mean(), xs.mean(), atol=1e-3)
    # affine invariance: whiten(a x + c) == whiten(x) for a > 0
    _close(masked_whiten(np.float32(3.0) * x + np.float32(7.0), m), out, rtol=1e-3, atol=1e-3)


def test_masked_whiten_grad():
    r = rng(10)
    x = r.normal(size=(B, T)).astype(np.float32)
    m = random_mask(r, B, T, empty_rows=1, single_rows=1)
    w = r.normal(size=(B, T)).astype(np.float32)
    for shift_mean in (True, False):
        check_grads(lambda a: masked_whiten(a, m, shift_mean=shift_mean) * w, (x,), order=1,
                    modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # whiten(x) sums to 0 over the valid entries whatever x: gradient of that sum is 0
    g = jax.grad(lambda a: masked_whiten(a, m).sum())(_garbage(x, m, INF))
    _close(g, 0.0, atol=1e-4)
