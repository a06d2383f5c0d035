"""Truncated importance weights (rlhf_jax/ops/importance.py): ``ratio = exp(prox - behaviour)``
and ``w = min(ratio, cap)`` on masked tokens, 0 elsewhere, no gradient.

Hand case: pi_prox = [0.5, 0.9, 0.2, 0.3], pi_behav = [0.25, 0.3, 0.4, 0.3], the last token
masked, cap 2.5: ratios 2, 3, 0.5 (and 0), weights 2, 2.5, 0.5, 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops import LOG_RATIO_CLAMP, truncated_importance_weights
from tests.helpers import EXTREME_LOG_RATIOS, assert_all_finite, float_array_strategy, rng

B, T = 3, 5


def test_truncated_importance_weights_hand():
    prox = jnp.log(jnp.array([[0.5, 0.9, 0.2, 0.3]]))
    behav = jnp.log(jnp.array([[0.25, 0.3, 0.4, 0.3]]))
    mask = jnp.array([[True, True, True, False]])
    w, ratio = truncated_importance_weights(prox, behav, mask, cap=2.5)
    np.testing.assert_allclose(ratio, [[2.0, 3.0, 0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(w, [[2.0, 2.5, 0.5, 0.0]], rtol=1e-6)


def test_truncated_importance_weights_numpy():
    r = rng(3)
    prox, behav = (r.normal(-2.0, 1.0, (B, T)).astype(np.float32) for _ in range(2))
    mask = r.random((B, T)) < 0.7
    w, ratio = truncated_importance_weights(prox, behav, mask, cap=1.5)
    want_r, want_w = np.zeros((B, T)), np.zeros((B, T))
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                want_r[i, t] = np.exp(float(prox[i, t]) - float(behav[i, t]))
                want_w[i, t] = min(want_r[i, t], 1.5)
    np.testing.assert_allclose(ratio, want_r, rtol=1e-5)
    np.testing.assert_allclose(w, want_w, rtol=1e-5)


@given(float_array_strategy((B, T), -30.0, 30.0), float_array_strategy((B, T), -30.0, 30.0),
       st.lists(st.booleans(), min_size=B * T, max_size=B * T),
       st.floats(1.0, 10.0, allow_subnormal=False))
def test_truncated_importance_weights_property_bounded_and_masked(prox, behav, bits, cap):
    mask = np.asarray(bits).reshape(B, T)
    w, ratio = (np.asarray(x) for x in truncated_importance_weights(prox, behav, mask,
                                                                    cap=cap))
    assert np.all(w >= 0.0) and np.all(w <= np.float32(cap))
    assert np.all(w[~mask] == 0.0) and np.all(ratio[~mask] == 0.0)
    below = mask & (ratio <= np.float32(cap))
    np.testing.assert_array_equal(w[below], ratio[below])  # no cap: the plain ratio


@pytest.mark.parametrize("lr", EXTREME_LOG_RATIOS + [float("nan")])
def test_truncated_importance_weights_property_extreme_log_ratios_stay_finite(lr):
    prox = jnp.array([[lr, lr, 0.0]], jnp.float32)
    behav = jnp.zeros((1, 3), jnp.float32)
    w, ratio = truncated_importance_weights(prox, behav, jnp.array([[True, False, True]]),
                                            cap=2.0)
    if not np.isnan(lr):
        assert_all_finite((w, ratio))
        assert float(ratio[0, 0]) <= np.exp(LOG_RATIO_CLAMP) * (1 + 1e-6)
    assert float(w[0, 1]) == 0.0 and float(w[0, 2]) == 1.0  # masked, and exp(0)


def test_truncated_importance_weights_grad_is_zero():
    """The weights are constants of the update: no gradient flows to either log-prob."""
    r = rng(4)
    prox, behav = (jnp.asarray(r.normal(size=(B, T)), jnp.float32) for _ in range(2))
    mask = jnp.ones((B, T), bool)
    g = jax.grad(lambda a, b: jnp.sum(truncated_importance_weights(a, b, mask, cap=1.5)[0]),
                 argnums=(0, 1))(prox, behav)
    for x in g:
        np.testing.assert_array_equal(np.asarray(x), 0.0)


def test_truncated_importance_weights_checks():
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                     jnp.ones((1, 2), bool), cap=0.0)
    with pytest.raises(AssertionError, match="assert_equal_shape"):
        truncated_importance_weights(jnp.zeros((2, 3)), jnp.zeros((3, 2)),
                                     jnp.ones((2, 3), bool), cap=2.0)
