"""Masked reductions: sum, mean, variance and whitening over the valid entries of an array.

All are finite in value *and* gradient for masks with zero or one valid entry: denominators are
clamped (``max(count, 1)``) and the variance of fewer than two entries is defined as 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.types import Mask

Axis = int | tuple[int, ...] | None


def masked_sum(x: Float[Array, "..."], mask: Mask, axis: Axis = None) -> Float[Array, "..."]:
    """``sum(x * mask)`` over ``axis``; masked entries add exactly 0 even if ``x`` is inf/NaN.

    Args:
      x: values, any shape.
      mask: same shape as ``x`` (or broadcastable); nonzero marks valid entries.
      axis: axes to reduce (all by default).
    """
    m = jnp.asarray(mask).astype(bool)
    return jnp.sum(jnp.where(m, x, 0.0), axis=axis)


def masked_count(mask: Mask, axis: Axis = None) -> Float[Array, "..."]:
    """Number of valid entries of ``mask`` over ``axis``, as float32."""
    return jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=axis)


def masked_mean(x: Float[Array, "..."], mask: Mask, axis: Axis = None) -> Float[Array, "..."]:
    """``sum(x * mask) / max(sum(mask), 1)``: 0 where no entry is valid.

    >>> float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1, 1, 0])))
    2.0
    """
    mask = jnp.broadcast_to(jnp.asarray(mask), jnp.shape(x))
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def masked_var(
    x: Float[Array, "..."], mask: Mask, axis: Axis = None, *, unbiased: bool = True
) -> Float[Array, "..."]:
    """Variance of the valid entries: ``sum(m (x - mean)^2) / (n - 1)`` (or ``/ n``).

    ``n`` is the number of valid entries; with ``n < 2`` (unbiased) or ``n < 1`` the result is 0.
    """
    mask = jnp.broadcast_to(jnp.asarray(mask), jnp.shape(x))
    x = jnp.where(mask.astype(bool), x, 0.0)  # no inf/NaN from masked entries, in value or grad
    keep = axis is not None
    n = masked_count(mask, axis)
    mean = masked_sum(x, mask, axis) / jnp.maximum(n, 1.0)
    mean_b = jnp.expand_dims(mean, axis) if keep else mean
    sq = masked_sum(jnp.square(x - mean_b), mask, axis)
    denom = n - 1.0 if unbiased else n
    return jnp.where(denom > 0, sq / jnp.maximum(denom, 1.0), 0.0)


def masked_whiten(
    x: Float[Array, "..."],
    mask: Mask,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> Float[Array, "..."]:
    """Normalise the valid entries to zero mean and unit variance over the whole array.

    ``(x - mean) * rsqrt(var + eps)``; with ``shift_mean=False`` the mean is added back (the
    OpenAI/TRL convention for rewards). Masked entries are returned as 0. Statistics are global
    over every axis, so under ``jax.jit`` on a sharded batch they are the whole batch's.
    """
    m = jnp.broadcast_to(jnp.asarray(mask), jnp.shape(x)).astype(bool)
    x = jnp.where(m, x, 0.0)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=unbiased)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)
