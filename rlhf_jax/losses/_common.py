"""Small helpers shared by the loss modules (private).

Shapes are checked with chex where the arrays enter a loss (at trace time, free under ``jit``):
a mask or an advantage of the wrong shape would otherwise broadcast silently (a ``[T]`` mask
applies one row's mask to every row; with ``B == T`` a ``[B]`` one masks columns).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.ops.masked import masked_count, masked_sum
from rlhf_jax.ops.stats import Max, Mean, Min


def as_mask(mask, shape) -> jax.Array:
    """Boolean mask of exactly ``shape`` (``None`` means all valid); other shapes are an error."""
    if mask is None:
        return jnp.ones(shape, bool)
    m = jnp.asarray(mask).astype(bool)
    chex.assert_shape(m, tuple(shape))
    return m


def mean_stat(x: jax.Array, mask: jax.Array) -> Mean:
    return Mean(masked_sum(x, mask), masked_count(mask))


def max_stat(x: jax.Array, mask: jax.Array) -> Max:
    return Max(jnp.max(jnp.where(mask, x, -jnp.inf), initial=-jnp.inf))  # empty ok


def min_stat(x: jax.Array, mask: jax.Array) -> Min:
    return Min(jnp.min(jnp.where(mask, x, jnp.inf), initial=jnp.inf))


def clean_log_ratio(a: jax.Array, b: jax.Array, mask: jax.Array, clamp: float) -> jax.Array:
    """``clip(a - b, -clamp, clamp)`` in float32 with NaN and masked entries set to 0.

    Clamping *before* ``exp`` keeps ratios of +-inf log-ratios finite in value and gradient.
    """
    chex.assert_equal_shape([a, b, mask])
    lr = a.astype(jnp.float32) - b.astype(jnp.float32)
    lr = jnp.where(mask & ~jnp.isnan(lr), lr, 0.0)
    return jnp.clip(lr, -clamp, clamp)


def per_sequence_broadcast(x: jax.Array, shape) -> jax.Array:
    """Broadcast per-sequence ``[B]`` values to per-token ``[B, T]`` (``[B, T]`` passes through);
    any other shape is an error."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1:
        chex.assert_shape(x, tuple(shape)[:1])
        x = x[:, None]
    else:
        chex.assert_shape(x, tuple(shape))
    return jnp.broadcast_to(x, shape)
