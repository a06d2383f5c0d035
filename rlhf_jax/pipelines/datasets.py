"""A stage's data from its ``DataConfig``: JSONL validated and encoded before any model is built,
skipped rows reported, evaluation split into fixed batches."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from rlhf_jax.data import (Tokenizer, detect_format, encode_preference, encode_prompts,
                           encode_sft, load_jsonl, pack_token_batch, pad_token_batch,
                           preference_batch, prompt_batch)
from rlhf_jax.pipelines.config import DataConfig
from rlhf_jax.types import PromptBatch


def report_skipped(path: str, invalid: int, too_long: int) -> None:
    """Say on stderr how many rows ``skip_invalid`` / ``on_overflow="skip"`` left out."""
    if invalid or too_long:
        print(f"{path}: skipped {invalid} invalid and {too_long} over-long rows",
              file=sys.stderr)


def sniff_format(path: str) -> str:
    """The JSONL format of ``path`` from its first non-blank line (``load_jsonl`` then
    validates every line and reports a malformed one precisely)."""
    with open(path, "rb") as f:
        first = next((ln for ln in f if ln.strip()), b"{}")
    try:
        return detect_format(json.loads(first))
    except ValueError:
        return "prompt_completion"


def load_sft_batch(path: str, data: DataConfig, tokenizer: Tokenizer):
    """``prompt``/``completion`` or ``messages`` JSONL as a ``TokenBatch`` (packed when
    ``data.packing``) of ``data.max_length`` tokens per row."""
    ds = load_jsonl(path, fmt=sniff_format(path), skip_invalid=data.skip_invalid)
    enc = encode_sft(ds, tokenizer, max_length=data.max_length, on_overflow=data.on_overflow)
    report_skipped(path, ds.skipped, enc.skipped)
    batch_fn = pack_token_batch if data.packing else pad_token_batch
    return batch_fn(enc.items, length=data.max_length, pad_id=tokenizer.pad_id)


def load_pairs(path: str, data: DataConfig, tokenizer: Tokenizer):
    """Preference JSONL as a ``PreferenceBatch`` (``data.max_prompt_length`` prompt tokens,
    ``data.max_length`` per side)."""
    ds = load_jsonl(path, fmt="preference", skip_invalid=data.skip_invalid)
    enc = encode_preference(ds, tokenizer, max_prompt_length=data.max_prompt_length,
                            max_length=data.max_length, on_overflow=data.on_overflow)
    report_skipped(path, ds.skipped, enc.skipped)
    return preference_batch(enc.items, length=data.max_length, pad_id=tokenizer.pad_id)


def load_prompts(path: str, data: DataConfig, tokenizer: Tokenizer
                 ) -> tuple[PromptBatch, list[dict]]:
    """Prompt-only JSONL (``prompt`` plus any extra columns) as a left-padded ``PromptBatch``
    of width ``data.max_prompt_length``, and the rows (reward functions get their extra
    columns). A prompt longer than that is an error naming its line, or with
    ``on_overflow="skip"`` is left out (with its row)."""
    ds = load_jsonl(path, fmt="prompt", skip_invalid=data.skip_invalid)
    enc = encode_prompts(ds, tokenizer, max_prompt_length=data.max_prompt_length,
                         on_overflow=data.on_overflow)
    report_skipped(path, ds.skipped, enc.skipped)
    batch = prompt_batch(enc.items, length=data.max_prompt_length, pad_id=tokenizer.pad_id)
    return batch, [ds.rows[i] for i in enc.kept]


def fixed_batches(data, batch_size: int) -> list:
    """Split a pytree of arrays into consecutive full batches (for evaluation); drops the tail."""
    n = len(jax.tree.leaves(data)[0])
    if n < batch_size:
        raise ValueError(f"evaluation set has {n} rows < batch size {batch_size}")
    return [jax.tree.map(lambda x, s=s: np.asarray(x[s:s + batch_size]), data)
            for s in range(0, n - batch_size + 1, batch_size)]
