"""Weight-only quantisation of a frozen base for QLoRA: int8 and 4-bit NormalFloat (NF4).

Both keep the ``[in, out]`` kernel layout, so a quantised kernel shards like the float one
(``parallel.rules``), and both dequantise on the fly inside the linear's forward (``dequantize``),
so only the codes and scales live in memory.

* **int8**, per output channel: ``s_j = max_i |W_ij| / 127``, ``q_ij = round(W_ij / s_j)`` in
  ``[-127, 127]``, ``W ~ q * s``. Stored ``kernel_int8 int8 [in, out]``, ``kernel_scale f32 [out]``.
* **NF4** (Dettmers et al. 2023, "QLoRA", sec. 3 and appendix E): blocks of ``BLOCK = 64``
  consecutive input rows per output column, ``m_bj = max |W|`` over the block, each normalised
  weight ``W / m`` rounded to the nearest of the 16 NF4 levels (``NF4``, the paper's code book,
  as in bitsandbytes). Two 4-bit codes per byte: row ``2k`` in the high nibble, ``2k + 1`` in the
  low one. The input dimension is zero-padded to a multiple of ``BLOCK`` (toy models have
  ``in = 344``). Stored ``kernel_nf4 uint8 [ceil(in / 64) * 32, out]``,
  ``kernel_absmax f32 [ceil(in / 64), out]``: 4.5 bits per weight.

Why not qwix: its ``qwix.quantize(w, "nf4", tiled_axes=...)`` gives the same code book and works
with jax 0.10.2, but stores the codes as ``jnp.uint4`` arrays (no safetensors dtype, one byte per
code on the host), and its LoRA side rewrites modules by intercepting ``dot_general``, which does
not fit a model whose params are a plain dict next to a fixed graph definition. The kernels here
are a few lines each and are tested against a NumPy reference (``tests/models/test_lora.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

MODES = ("int8", "nf4")
BLOCK = 64
"""NF4 block size along the input dimension (QLoRA's, and bitsandbytes' default)."""

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
"""The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact 0 (QLoRA app. E)."""

_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # a value above the k-th midpoint rounds to code >= k + 1


def quantized_names(mode: str) -> tuple[str, str]:
    """The two param names that replace ``kernel``: (codes, scales)."""
    if mode not in MODES:
        raise ValueError(f"quantize_base must be one of {MODES} or None, got {mode!r}")
    return ("kernel_int8", "kernel_scale") if mode == "int8" else ("kernel_nf4", "kernel_absmax")


def _safe(m):
    return jnp.where(m == 0, 1.0, m)


def quantize_int8(w: Float[Array, "I O"]) -> dict[str, jax.Array]:
    """``{"kernel_int8": int8 [I, O], "kernel_scale": f32 [O]}`` (per-output-channel absmax)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0  # [O]
    q = jnp.clip(jnp.round(w / _safe(scale)), -127, 127).astype(jnp.int8)
    return {"kernel_int8": q, "kernel_scale": scale}


def quantize_nf4(w: Float[Array, "I O"]) -> dict[str, jax.Array]:
    """``{"kernel_nf4": uint8 [ceil(I/64)*32, O], "kernel_absmax": f32 [ceil(I/64), O]}``."""
    w = jnp.asarray(w, jnp.float32)
    i, o = w.shape
    nb = -(-i // BLOCK)
    blocks = jnp.pad(w, ((0, nb * BLOCK - i), (0, 0))).reshape(nb, BLOCK, o)  # [NB, 64, O]
    absmax = jnp.max(jnp.abs(blocks), axis=1)  # [NB, O]
    x = blocks / _safe(absmax)[:, None]
    codes = jnp.sum(x[..., None] > jnp.asarray(_MIDPOINTS), axis=-1).astype(jnp.uint8)
    codes = codes.reshape(nb * BLOCK // 2, 2, o)  # rows (2k, 2k + 1) share byte k
    return {"kernel_nf4": (codes[:, 0] << 4) | codes[:, 1], "kernel_absmax": absmax}


def dequantize(q: dict, d_in: int, dtype) -> Float[Array, "I O"]:
    """The ``[d_in, O]`` kernel in ``dtype`` from either quantised form (``quantize_*``)."""
    if "kernel_int8" in q:
        return (q["kernel_int8"].astype(jnp.float32) * q["kernel_scale"]).astype(dtype)
    packed, absmax = q["kernel_nf4"], q["kernel_absmax"]  # [NB*32, O], [NB, O]
    codes = jnp.stack([packed >> 4, packed & 15], axis=1).reshape(-1, packed.shape[-1])
    levels = jnp.asarray(NF4)[codes.astype(jnp.int32)]  # [NB*64, O]
    w = levels.reshape(absmax.shape[0], BLOCK, -1) * absmax[:, None]
    return w.reshape(-1, w.shape[-1])[:d_in].astype(dtype)


def quantize_kernel(w: Float[Array, "I O"], mode: str) -> dict[str, jax.Array]:
    """``quantize_int8`` or ``quantize_nf4`` by name (``MODES``)."""
    quantized_names(mode)
    return quantize_int8(w) if mode == "int8" else quantize_nf4(w)
