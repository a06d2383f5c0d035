"""Tests of rlhf_jax/ops/kl_control.py: fixed and adaptive (Ziegler et al., 2019) controllers.

Adaptive update: ``e = clip(KL / target - 1, -0.2, 0.2)``,
``beta <- beta (1 + e n_steps / horizon)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops import (
    KL_CONTROLLERS,
    KLControllerState,
    adaptive_kl_update,
    fixed_kl_update,
    kl_controller_init,
)
from tests.helpers import check_grads, rng

NAN, INF = float("nan"), float("inf")


def np_adaptive(coef, kls, n_steps, target, horizon):
    """float64 loop over a sequence of updates; returns every intermediate coefficient."""
    out = []
    for kl, n in zip(kls, n_steps):
        e = min(max(kl / target - 1.0, -0.2), 0.2)
        if not np.isfinite(e):
            e = 0.0
        coef = coef * (1.0 + e * n / horizon)
        out.append(coef)
    return np.asarray(out)


def _scan(update, **kw):
    """``lax.scan`` of an update over a sequence of KLs (n_steps = 32 each), jitted."""

    def body(s, kl):
        s = update(s, observed_kl=kl, n_steps=jnp.int32(32), **kw)
        return s, s.kl_coef

    return jax.jit(lambda s, kls: jax.lax.scan(body, s, kls))


_scan_fixed = _scan(fixed_kl_update, target=1.0, horizon=10.0)
_scan_adaptive = _scan(adaptive_kl_update, target=4.0, horizon=500.0)
_step_adaptive = jax.jit(lambda s, k, n: adaptive_kl_update(s, observed_kl=k, n_steps=n,
                                                            target=4.0, horizon=500.0))


# ------------------------------------------------------------------ kl_controller_init


def test_kl_controller_init_hand():
    s = kl_controller_init(0.1)
    assert isinstance(s, KLControllerState)
    assert s.kl_coef.dtype == jnp.float32 and s.kl_coef.shape == ()
    assert float(s.kl_coef) == float(np.float32(0.1))
    assert float(kl_controller_init(0.0).kl_coef) == 0.0  # 0 (no penalty) is allowed


def test_kl_controller_init_numpy():
    for v in rng(0).uniform(0, 10, size=20):
        assert float(kl_controller_init(float(v)).kl_coef) == float(np.float32(v))


@given(v=st.floats(0.0, 1e6, allow_nan=False, allow_subnormal=False))
def test_kl_controller_init_property_roundtrip(v):
    assert float(kl_controller_init(v).kl_coef) == float(np.float32(v))


@given(v=st.floats(-1e6, -1e-9, allow_nan=False, allow_subnormal=False))
def test_kl_controller_init_property_negative_raises(v):
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        kl_controller_init(v)


# ------------------------------------------------------------------ fixed_kl_update


def test_fixed_kl_update_hand():
    s = kl_controller_init(0.05)
    # KL far above a target: a fixed controller still keeps 0.05 (target/horizon are ignored).
    out = fixed_kl_update(s, observed_kl=jnp.array(100.0), n_steps=64, target=6.0, horizon=1e4)
    assert float(out.kl_coef) == float(np.float32(0.05))


def test_fixed_kl_update_numpy():
    r = rng(1)
    s = kl_controller_init(0.2)
    for kl, n in zip(r.uniform(0, 20, 30), r.integers(1, 100, 30)):
        s = fixed_kl_update(s, observed_kl=jnp.asarray(kl, jnp.float32), n_steps=int(n))
        assert float(s.kl_coef) == float(np.float32(0.2))


@given(kls=st.lists(st.one_of(st.floats(-1e6, 1e6, allow_subnormal=False), st.just(NAN),
                              st.just(INF)), min_size=1, max_size=8),
       coef=st.floats(0.0, 10.0, allow_subnormal=False))
def test_fixed_kl_update_property_constant_under_scan(kls, coef):
    kls = jnp.asarray(kls + [0.0] * (8 - len(kls)), jnp.float32)  # fixed length: one compile
    _, coefs = _scan_fixed(kl_controller_init(coef), kls)
    np.testing.assert_array_equal(np.asarray(coefs), np.full(8, np.float32(coef)))


def test_fixed_kl_update_grad_is_identity():
    # Not required (identity on the state) but cheap: d new / d old = 1.
    g = jax.grad(
        lambda c: fixed_kl_update(KLControllerState(c), observed_kl=1.0, n_steps=1).kl_coef)
    assert float(g(jnp.float32(0.3))) == 1.0


# ------------------------------------------------------------------ adaptive_kl_update


def _upd(coef, kl, n_steps=100, target=6.0, horizon=1000.0):
    return float(adaptive_kl_update(kl_controller_init(coef), observed_kl=jnp.float32(kl),
                                    n_steps=n_steps, target=target, horizon=horizon).kl_coef)


def test_adaptive_kl_update_hand():
    # target 6, horizon 1000, n_steps 100 (n/h = 0.1), beta 0.1:
    # KL 7:  e = 7/6 - 1 = 0.1666667       -> 0.1 * (1 + 0.01666667) = 0.10166667
    # KL 12: e = 1 clipped to 0.2           -> 0.1 * 1.02 = 0.102
    # KL 3:  e = -0.5 clipped to -0.2       -> 0.1 * 0.98 = 0.098
    # KL 5:  e = -1/6                       -> 0.1 * (1 - 0.01666667) = 0.09833333
    # KL 6:  e = 0                          -> 0.1 unchanged
    np.testing.assert_allclose(_upd(0.1, 7.0), 0.10166667, rtol=1e-6)
    np.testing.assert_allclose(_upd(0.1, 12.0), 0.102, rtol=1e-6)
    np.testing.assert_allclose(_upd(0.1, 3.0), 0.098, rtol=1e-6)
    np.testing.assert_allclose(_upd(0.1, 5.0), 0.09833333, rtol=1e-6)
    assert _upd(0.1, 6.0) == float(np.float32(0.1))
    # NaN KL: no change; +inf KL: e clipped to +0.2.
    assert _upd(0.1, NAN) == float(np.float32(0.1))
    np.testing.assert_allclose(_upd(0.1, INF), 0.102, rtol=1e-6)


def test_adaptive_kl_update_numpy():
    r = rng(2)
    kls = r.uniform(0, 15, 40).astype(np.float32)
    kls[[5, 17]] = np.nan
    n_steps = r.integers(1, 256, 40)
    s = kl_controller_init(0.05)
    got = []
    for kl, n in zip(kls, n_steps):
        s = adaptive_kl_update(s, observed_kl=jnp.float32(kl), n_steps=int(n), target=6.0,
                               horizon=2000.0)
        got.append(float(s.kl_coef))
    np.testing.assert_allclose(got, np_adaptive(0.05, kls.astype(float), n_steps, 6.0, 2000.0),
                               rtol=1e-5)


@given(coef=st.floats(1e-4, 10.0, allow_subnormal=False),
       kl=st.floats(0.0, 100.0, allow_subnormal=False),
       target=st.floats(0.1, 20.0, allow_subnormal=False), n_steps=st.integers(1, 512))
def test_adaptive_kl_update_property_moves_towards_target(coef, kl, target, n_steps):
    new = _upd(coef, kl, n_steps=n_steps, target=target, horizon=10000.0)
    old = float(np.float32(coef))
    ratio = np.float32(kl) / np.float32(target)
    if ratio > 1.0:
        assert new >= old  # KL too high: stronger penalty (>= only for float32 rounding)
    elif ratio < 1.0:
        assert new <= old
    else:
        assert new == old
    e = min(max(float(ratio) - 1.0, -0.2), 0.2)
    if abs(e) * n_steps / 10000.0 > 1e-5:  # a step float32 can see: strictly in that direction
        assert (new > old) if e > 0 else (new < old)
    # The step is bounded: |beta'/beta - 1| <= 0.2 n_steps / horizon.
    assert abs(new / old - 1.0) <= 0.2 * n_steps / 10000.0 + 1e-6
    assert new > 0.0


@given(coef=st.floats(1e-4, 10.0, allow_subnormal=False),
       target=st.floats(0.1, 20.0, allow_subnormal=False))
def test_adaptive_kl_update_property_nan_and_at_target_unchanged(coef, target):
    old = float(np.float32(coef))
    assert _upd(coef, NAN, target=target) == old
    assert _upd(coef, float(np.float32(target)), target=float(np.float32(target))) == old


@given(kls=st.lists(st.one_of(st.floats(0.0, 50.0, allow_subnormal=False), st.just(NAN)),
                    min_size=8, max_size=8))
def test_adaptive_kl_update_property_jit_and_scan_equal_loop(kls):
    kls32 = jnp.asarray(kls, jnp.float32)
    _, scanned = _scan_adaptive(kl_controller_init(0.1), kls32)
    s, looped = kl_controller_init(0.1), []
    for kl in kls32:
        s = _step_adaptive(s, kl, 32)
        looped.append(float(s.kl_coef))
    np.testing.assert_allclose(np.asarray(scanned), looped, rtol=1e-6)
    np.testing.assert_allclose(looped, np_adaptive(0.1, kls, [32] * 8, 4.0, 500.0), rtol=1e-5)


def test_adaptive_kl_update_property_bad_hyperparameters_raise():
    s = kl_controller_init(0.1)
    for target, horizon in ((0.0, 10.0), (-1.0, 10.0), (1.0, 0.0), (1.0, -5.0)):
        with pytest.raises(ValueError, match="target and horizon must be > 0"):
            adaptive_kl_update(s, observed_kl=jnp.float32(1.0), n_steps=1, target=target,
                               horizon=horizon)
    with pytest.raises(ValueError):
        kl_controller_init(-0.1)


def test_adaptive_kl_update_property_table():
    assert KL_CONTROLLERS == {"fixed": fixed_kl_update, "adaptive": adaptive_kl_update}


def test_adaptive_kl_update_grad():
    # d beta'/d beta = 1 + e n / h: for KL 9, target 6 -> e = 0.2 (clipped), n/h = 0.1 -> 1.02.
    def f(c, kl):
        return adaptive_kl_update(KLControllerState(c), observed_kl=kl, n_steps=100, target=6.0,
                                  horizon=1000.0).kl_coef

    for kl, mult in ((9.0, 1.02), (7.0, 1.0 + 0.1 / 6), (3.0, 0.98), (NAN, 1.0)):
        g = jax.grad(f)(jnp.float32(0.3), jnp.float32(kl))
        np.testing.assert_allclose(float(g), mult, rtol=1e-6)
    check_grads(lambda c: f(c, jnp.float32(7.0)), (jnp.float32(0.3),), order=1, modes=["rev"],
                eps=1e-3, atol=1e-2, rtol=1e-2)
    # Inside the clip range the update is smooth in the KL too: d beta'/d KL = beta n / (h target).
    np.testing.assert_allclose(float(jax.grad(f, argnums=1)(jnp.float32(0.3), jnp.float32(7.0))),
                               0.3 * 0.1 / 6.0, rtol=1e-5)
