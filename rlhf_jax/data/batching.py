"""Encoded id lists -> fixed-shape NumPy batches: padding, packing, preference pairs, prompts.

Design choices, and why:
- NumPy in, NumPy out (``int32`` ids/positions/segments, ``bool`` masks): batches are built on
  the host and sharded onto devices by the trainer, and fixed shapes mean one compilation.
- A document's first token is never a target. The ``TokenBatch`` convention scores ``tokens[t]``
  with the logits at ``t - 1``; at a document start those belong to padding (``t = 0``) or,
  in a packed row, to the *previous* document. So its ``loss_mask`` bit is cleared, and packed
  rows give exactly the targets of the same documents padded one per row.
- Packing is first-fit-decreasing over whole documents (none is split across rows): longest
  first, each into the first row with room. Deterministic (ties keep input order), and within
  about 11/9 of the optimal number of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.types import PreferenceBatch, PromptBatch, TokenBatch

Ids = Sequence[int]


def _empty(rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full((rows, length), pad_id, np.int32),
        "loss_mask": np.zeros((rows, length), bool),
        "attention_mask": np.zeros((rows, length), bool),
        "segment_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
    }


def _checked(items: Sequence[tuple[Ids, Ids]], length: int, *, allow_empty: bool
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    if type(length) is not int or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not items:
        raise ValueError("no items to batch")
    out = []
    for i, (ids, mask) in enumerate(items):
        ids, mask = np.asarray(ids, np.int32).reshape(-1), np.asarray(mask).reshape(-1)
        if len(ids) != len(mask):
            raise ValueError(f"item {i}: {len(ids)} ids but {len(mask)} target-mask entries")
        if len(ids) > length:
            raise ValueError(f"item {i} has {len(ids)} tokens, longer than length={length}")
        if not allow_empty and len(ids) == 0:
            raise ValueError(f"item {i} is empty: every packed document needs a token")
        out.append((ids, mask.astype(bool)))
    return out


def _place(out: dict[str, np.ndarray], row: int, start: int, ids: np.ndarray,
           mask: np.ndarray, segment: int) -> None:
    end = start + len(ids)
    out["tokens"][row, start:end] = ids
    out["loss_mask"][row, start:end] = mask
    if len(ids):
        out["loss_mask"][row, start] = False  # a document's first token is no target
    out["attention_mask"][row, start:end] = True
    out["segment_ids"][row, start:end] = segment
    out["positions"][row, start:end] = np.arange(len(ids))


def pad_token_batch(items: Sequence[tuple[Ids, Ids]], *, length: int, pad_id: int
                    ) -> TokenBatch:
    """One sequence per row, right-padded to ``length``: a ``TokenBatch`` of ``[N, length]``.

    ``attention_mask`` and ``segment_ids`` (= 1) mark the real tokens, ``positions`` count
    ``0..n-1`` (0 on padding), ``loss_mask`` is the target mask (its first entry cleared: no
    logit predicts position 0).

    Args:
      items: ``N`` pairs ``(ids, target_mask)`` of equal lengths ``<= length``.
    """
    checked = _checked(items, length, allow_empty=True)
    out = _empty(len(checked), length, pad_id)
    for row, (ids, mask) in enumerate(checked):
        _place(out, row, 0, ids, mask, 1)
    return TokenBatch(**out)


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Item indices per row: longest first, each into the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack_token_batch(items: Sequence[tuple[Ids, Ids]], *, length: int, pad_id: int,
                     num_rows: int | None = None) -> TokenBatch:
    """Pack whole sequences into rows of ``length`` tokens (first-fit decreasing).

    In each row the documents get ``segment_ids`` 1, 2, 3, ... (0 on padding) and
    ``positions`` restarting at 0; ``loss_mask`` is each document's target mask with its first
    entry cleared (the previous document's last logit must not be trained on it).

    Args:
      items: pairs ``(ids, target_mask)``, each of ``1..length`` tokens.
      num_rows: pad the result with empty rows to exactly this many (fixed shapes); error if
        the items need more. None: as many rows as packing needs.

    Returns:
      A ``TokenBatch`` of ``[R, length]``.
    """
    checked = _checked(items, length, allow_empty=False)
    rows = _first_fit_decreasing([len(ids) for ids, _ in checked], length)
    if num_rows is not None and len(rows) > num_rows:
        total = sum(len(ids) for ids, _ in checked)
        raise ValueError(f"{len(checked)} sequences ({total} tokens) need {len(rows)} packed "
                         f"rows of length {length}, more than num_rows={num_rows}")
    out = _empty(len(rows) if num_rows is None else num_rows, length, pad_id)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            ids, mask = checked[i]
            _place(out, r, start, ids, mask, segment)
            start += len(ids)
    return TokenBatch(**out)


def preference_batch(items: Sequence[tuple[Ids, Ids, Ids]], *, length: int, pad_id: int
                     ) -> PreferenceBatch:
    """Pairs ``(prompt, chosen, rejected)`` -> ``PreferenceBatch`` of two ``[N, length]`` batches.

    ``chosen`` is ``pad_token_batch`` of ``prompt + chosen`` with the target mask on the
    response tokens; ``rejected`` likewise. Row ``i`` of both belongs to pair ``i``.
    """
    sides: dict[str, list[tuple[list[int], list[int]]]] = {"chosen": [], "rejected": []}
    for i, (prompt, chosen, rejected) in enumerate(items):
        for key, response in (("chosen", chosen), ("rejected", rejected)):
            prompt, response = list(prompt), list(response)
            if not response:
                raise ValueError(f"pair {i}: the {key} response is empty")
            n = len(prompt) + len(response)
            if n > length:
                raise ValueError(f"pair {i}: prompt + {key} is {n} tokens, longer than "
                                 f"length={length}")
            sides[key].append((prompt + response, [0] * len(prompt) + [1] * len(response)))
    return PreferenceBatch(chosen=pad_token_batch(sides["chosen"], length=length, pad_id=pad_id),
                           rejected=pad_token_batch(sides["rejected"], length=length,
                                                    pad_id=pad_id))


def prompt_batch(items: Sequence[Ids], *, length: int, pad_id: int) -> PromptBatch:
    """Left-pad prompts to exactly ``length``: ``PromptBatch(tokens [N, length], mask)``.

    The layout of ``rlhf_jax.sampling.pad_prompts`` (generation continues from the last
    column), with the length fixed instead of bucketed.
    """
    if type(length) is not int or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not items:
        raise ValueError("no prompts to batch")
    tokens = np.full((len(items), length), pad_id, np.int32)
    mask = np.zeros((len(items), length), bool)
    for i, ids in enumerate(items):
        ids = np.asarray(ids, np.int32).reshape(-1)
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        if len(ids) > length:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than length={length}")
        tokens[i, length - len(ids):] = ids
        mask[i, length - len(ids):] = True
    return PromptBatch(tokens=tokens, mask=mask)
