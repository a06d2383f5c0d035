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
