"""A stage's data from its ``DataConfig``: any of TRL's formats (standard or conversational) in
JSONL, Parquet or a saved ``datasets`` directory, validated and encoded before any model is
built, skipped and truncated rows reported, evaluation split into fixed batches that cover every
row.
"""

from __future__ import annotations

import sys
import warnings
from typing import Mapping

import jax
import numpy as np

from rlhf_jax.data import (Dataset, Tokenizer, encode_preference, encode_prompts, encode_sft,
                           load_dataset, pack_token_batch, pad_token_batch, preference_batch,
                           prompt_batch)
from rlhf_jax.data.encode import Encoded
from rlhf_jax.pipelines.config import DataConfig
from rlhf_jax.sampling import PAD_BUCKETS, bucket_length
from rlhf_jax.types import PromptBatch, TokenBatch

SFT_FORMATS = ("text", "prompt_completion", "messages")
PAIR_FORMATS = ("preference",)
PROMPT_FORMATS = ("prompt", "messages", "prompt_completion", "preference",
                  "unpaired_preference")


def _describe(path: str, counts: dict) -> str:
    return (f"{path}: skipped {counts['invalid']} invalid and {counts['too_long']} over-long "
            f"rows, truncated {counts['truncated']}, of {counts['rows']}")


def report_rows(path: str, ds: Dataset, enc: Encoded, report: dict | None = None) -> dict:
    """Say on stderr what was left out or cut (``skip_invalid``, ``on_overflow``) and record the
    counts in ``report`` under ``path`` (a stage writes them to ``result.json`` and says them
    again when it finishes: ``summarize_report``)."""
    counts = {"rows": len(ds) + ds.skipped, "invalid": ds.skipped, "too_long": enc.skipped,
              "truncated": enc.truncated}
    if ds.skipped or enc.skipped or enc.truncated:
        print(_describe(path, counts), file=sys.stderr)
    if report is not None:
        report[path] = counts
    return counts


def row_unit(data: DataConfig, report: Mapping[str, dict]) -> str:
    """What a row of the train data is, for ``BatchIterator``'s messages: examples, or with
    ``data.packing`` "packed rows of L tokens (from N examples)"."""
    if not data.packing:
        return "examples"
    counts = report.get(data.train, {})
    used = counts.get("rows", 0) - counts.get("invalid", 0) - counts.get("too_long", 0)
    return f"packed rows of {data.max_length} tokens (from {used} examples)"


def summarize_report(report: dict | None) -> str | None:
    """One line per file that lost or cut rows (None when every row was used whole)."""
    lines = [_describe(p, c) for p, c in (report or {}).items()
             if c["invalid"] or c["too_long"] or c["truncated"]]
    return "\n".join(lines) or None


def padded_length(longest: int, limit: int) -> int:
    """The padded length of a dataset whose longest row has ``longest`` tokens: the sampler's
    next bucket up (``sampling.PAD_BUCKETS``), capped at ``limit`` (the config's maximum).
    Short data then costs short rows however generous the limit, and few shapes compile."""
    return bucket_length(longest, [b for b in PAD_BUCKETS if b < limit] + [limit])


def _load(path: str, data: DataConfig, tokenizer: Tokenizer, allowed: tuple[str, ...],
          stage: str) -> Dataset:
    ds = load_dataset(path, skip_invalid=data.skip_invalid)
    if ds.fmt not in allowed:
        raise ValueError(f"{path}: {stage} reads the formats {list(allowed)}, but the rows are "
                         f"{ds.fmt!r} (fields {sorted(ds.rows[0])})")
    if not ds.conversational and ds.fmt != "text" and tokenizer.chat_template is not None:
        warnings.warn(
            f"{path}: the rows are plain strings, so they reach the model as raw text without "
            "the tokenizer's chat template; a chat model expects it: give conversations "
            "([{'role': 'user', 'content': ...}]) to have it applied", UserWarning, stacklevel=3)
    return ds


def load_sft_batch(path: str, data: DataConfig, tokenizer: Tokenizer, *,
                   report: dict | None = None):
    """``text``, ``prompt_completion`` or ``messages`` data as a ``TokenBatch``: packed into rows
    of ``data.max_length`` tokens when ``data.packing``, else padded to ``padded_length``."""
    ds = _load(path, data, tokenizer, SFT_FORMATS, "SFT")
    enc = encode_sft(ds, tokenizer, max_length=data.max_length, on_overflow=data.on_overflow)
    report_rows(path, ds, enc, report)
    if data.packing:  # rows are filled up to max_length
        return pack_token_batch(enc.items, length=data.max_length, pad_id=tokenizer.pad_id)
    length = padded_length(max(len(ids) for ids, _ in enc.items), data.max_length)
    return pad_token_batch(enc.items, length=length, pad_id=tokenizer.pad_id)


def load_pairs(path: str, data: DataConfig, tokenizer: Tokenizer, *,
               report: dict | None = None):
    """Preference data (explicit or implicit prompt) as a ``PreferenceBatch``: prompts of at
    most ``data.max_prompt_length`` tokens, each side padded to ``padded_length`` (at most
    ``data.max_length``)."""
    ds = _load(path, data, tokenizer, PAIR_FORMATS, "this stage")
    enc = encode_preference(ds, tokenizer, max_prompt_length=data.max_prompt_length,
                            max_length=data.max_length, on_overflow=data.on_overflow)
    report_rows(path, ds, enc, report)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in enc.items)
    return preference_batch(enc.items, length=padded_length(longest, data.max_length),
                            pad_id=tokenizer.pad_id)


def load_prompts(path: str, data: DataConfig, tokenizer: Tokenizer, *,
                 report: dict | None = None) -> tuple[PromptBatch, list[dict]]:
    """Prompts (of any format that has one; conversations rendered with the generation prompt)
    as a left-padded ``PromptBatch`` (width ``padded_length``, at most
    ``data.max_prompt_length``), and their rows with
    ``"prompt"`` set to each prompt as given (a string or a conversation: what reward functions
    receive) and the other columns kept. A prompt longer than that is an error naming its line,
    or with ``on_overflow="skip"`` is left out (with its row)."""
    ds = _load(path, data, tokenizer, PROMPT_FORMATS, "generation")
    enc = encode_prompts(ds, tokenizer, max_prompt_length=data.max_prompt_length,
                         on_overflow=data.on_overflow)
    report_rows(path, ds, enc, report)
    width = padded_length(max(map(len, enc.items)), data.max_prompt_length)
    batch = prompt_batch(enc.items, length=width, pad_id=tokenizer.pad_id)
    rows = [ds.rows[i] | {"prompt": p} for i, p in zip(enc.kept, enc.prompts)]
    return batch, rows


def row_length(*batches) -> int:
    """The padded row length of ``TokenBatch``es / ``PreferenceBatch``es (None skipped)."""
    return max(jax.tree.leaves(b)[0].shape[1] for b in batches if b is not None)


def _blank(tree):
    """The same rows with no loss tokens: they fill an evaluation batch and add nothing."""
    return jax.tree.map(
        lambda t: t._replace(loss_mask=np.zeros_like(t.loss_mask))
        if isinstance(t, TokenBatch) else t, tree, is_leaf=lambda t: isinstance(t, TokenBatch))


def fixed_batches(data, batch_size: int) -> list:
    """Split a pytree of arrays into consecutive batches of ``batch_size`` rows (evaluation).

    Every row is evaluated: the last batch is filled up with copies of the first rows whose
    loss masks are all 0 (token losses sum and count nothing there; the preference losses'
    pair masks leave them out), so one compiled shape serves every batch.
    """
    n = len(jax.tree.leaves(data)[0])
    pad = -n % batch_size
    if pad:
        fill = _blank(jax.tree.map(lambda x: np.asarray(x)[np.arange(pad) % n], data))
        data = jax.tree.map(lambda x, f: np.concatenate([np.asarray(x), f]), data, fill)
    return [jax.tree.map(lambda x, s=s: np.asarray(x[s:s + batch_size]), data)
            for s in range(0, n + pad, batch_size)]
