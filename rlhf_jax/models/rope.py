"""Rotary position embeddings (Su et al., 2021) with optional Llama-3 or linear scaling.

Uses the "rotate half" layout of the Hugging Face Llama implementation (the first and second
halves of each head are the two coordinates of each rotated pair), so imported weights need no
permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from rlhf_jax.models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """``theta^(-2i/d)`` for ``i < d/2``, rescaled when ``scaling`` is given.

    Linear (position interpolation, Chen et al. 2023; HF ``rope_type: linear``, Gemma 3's global
    layers): every frequency is divided by ``factor``. Llama 3: wavelengths above
    ``L / low_freq_factor`` are divided by ``factor``, those below ``L / high_freq_factor`` are
    kept, and the band between is interpolated smoothly.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv / scaling.factor).astype(np.float32)
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(
    x: Float[Array, "B T H K"], positions: Int[Array, "B T"], inv_freq: np.ndarray
) -> Float[Array, "B T H K"]:
    """Rotate ``x`` by ``positions * inv_freq``: ``x cos + rotate_half(x) sin`` in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, K/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
