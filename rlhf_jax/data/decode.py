"""Sampled token ids back to text."""

from __future__ import annotations

import numpy as np

from rlhf_jax.data.tokenizer import Tokenizer


def decode_completions(tokenizer: Tokenizer, tokens, mask) -> list[str]:
    """Completion text of each row up to (excluding) its EOS: ``tokens [B, C]`` with ``mask``
    1 up to and including the EOS (``sampling.SampleOutput``'s layout)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    eos = set(tokenizer.eos_ids)
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m and int(t) not in eos])
            for row, mrow in zip(tokens, mask)]


__all__ = ["decode_completions"]
