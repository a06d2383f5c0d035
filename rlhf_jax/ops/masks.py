"""Completion masks from end-of-sequence tokens, and the index of the last real token.

A sampler writes completions right-padded to a fixed length. The completion runs up to and
including its first EOS (any of several ids); everything after is padding, even when the pad id
equals an EOS id (Llama-style ``pad == eos``), because only the *first* EOS ends the sequence.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def completion_mask_from_eos(
    tokens: Int[Array, "B T"],
    *,
    eos_ids: int | Sequence[int],
    include_eos: bool = True,
) -> Bool[Array, "B T"]:
    """Mask of completion tokens: positions up to the first EOS (inclusive by default).

    A row with no EOS is all valid (a truncated completion).

    >>> completion_mask_from_eos(jnp.array([[5, 2, 2, 2]]), eos_ids=2).astype(int).tolist()
    [[1, 1, 0, 0]]
    """
    ids = jnp.atleast_1d(jnp.asarray(eos_ids, dtype=tokens.dtype))
    is_eos = jnp.any(tokens[..., None] == ids, axis=-1)  # [B, T]
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS strictly before t
    mask = eos_before == 0
    if not include_eos:
        mask = mask & ~is_eos
    return mask


def is_truncated(tokens: Int[Array, "B T"], *, eos_ids: int | Sequence[int]) -> Bool[Array, " B"]:
    """True for rows that never emit an EOS (their last state needs a bootstrap value)."""
    ids = jnp.atleast_1d(jnp.asarray(eos_ids, dtype=tokens.dtype))
    return ~jnp.any(tokens[..., None] == ids, axis=(-1, -2))


def last_token_index(mask: Bool[Array, "B T"]) -> Int[Array, " B"]:
    """Index of the last valid position per row (where a scalar reward head is read); 0 if none.

    Works for left-padded, right-padded and packed-with-holes masks alike.
    """
    m = jnp.asarray(mask).astype(bool)
    t = m.shape[-1]
    idx = jnp.where(m, jnp.arange(t), -1)
    return jnp.maximum(jnp.max(idx, axis=-1), 0).astype(jnp.int32)
