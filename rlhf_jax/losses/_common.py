"""Small helpers shared by the loss modules (private)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.masked import masked_count, masked_sum
from rlhf_jax.ops.stats import Max, Mean, Min


def as_mask(mask, shape) -> jax.Array:
    """Boolean mask broadcast to ``shape`` (``None`` means all valid)."""
    if mask is None:
        return jnp.ones(shape, bool)
    return jnp.broadcast_to(jnp.asarray(mask).astype(bool), shape)


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
    lr = a.astype(jnp.float32) - b.astype(jnp.float32)
    lr = jnp.where(mask & ~jnp.isnan(lr), lr, 0.0)
    return jnp.clip(lr, -clamp, clamp)


def per_sequence_broadcast(x: jax.Array, shape) -> jax.Array:
    """Broadcast per-sequence ``[B]`` values to per-token ``[B, T]`` (``[B, T]`` passes through)."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1:
        x = x[:, None]
    return jnp.broadcast_to(x, shape)
