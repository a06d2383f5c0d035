"""Axis-letter glossary and the array aliases used in signatures across rlhf_jax.

Axis letters (used in jaxtyping annotations such as ``Float[Array, "B T"]`` and in
``# [B, T]`` comments):

====  ===========================================================================
B     batch: sequences (or preference pairs) in a batch
G     group: completions sampled for one prompt (GRPO / RLOO)
N     number of prompts (``B = N * G`` for grouped data)
T     time: token positions of a sequence (completion positions for RL losses)
V     vocabulary
D     model (hidden) dimension
====  ===========================================================================

Conventions: ``mask`` arrays are 1 for tokens that count and 0 elsewhere, of any numeric or
boolean dtype; log-probabilities are float32; per-token quantities are aligned with the token
they score (the log-prob at ``t`` is ``log pi(y_t | y_<t)``).
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int

ArrayLike = Union[jax.Array, np.ndarray]
Mask = Union[Float[Array, "..."], Bool[Array, "..."], Int[Array, "..."]]

__all__ = ["Array", "ArrayLike", "Bool", "Float", "Int", "Mask"]


# --- batch pytrees (NamedTuples: pytrees with no Flax dependency) ---------------------------

from typing import NamedTuple  # noqa: E402


class TokenBatch(NamedTuple):
    """Sequences for teacher-forced training (SFT, reward/DPO inputs, distillation).

    Next-token convention: the model reads ``tokens`` and the logits at position ``t`` predict
    ``tokens[t + 1]``; ``loss_mask[t]`` marks ``tokens[t]`` as a *target* (so the loss uses
    ``loss_mask[:, 1:]`` against logits ``[:, :-1]``). Right-padded; for packed rows,
    ``segment_ids`` separates the documents and ``positions`` restart at 0 in each.
    """

    tokens: Int[Array, "B T"]
    loss_mask: Bool[Array, "B T"]
    attention_mask: Bool[Array, "B T"]
    segment_ids: Int[Array, "B T"]
    positions: Int[Array, "B T"]


class PreferenceBatch(NamedTuple):
    """Prompt + chosen and prompt + rejected sequences of the same pairs (``loss_mask`` on the
    response tokens only)."""

    chosen: TokenBatch
    rejected: TokenBatch


class PromptBatch(NamedTuple):
    """Left-padded prompts for generation (``rlhf_jax.sampling``)."""

    tokens: Int[Array, "B P"]
    mask: Bool[Array, "B P"]


__all__ += ["TokenBatch", "PreferenceBatch", "PromptBatch"]
