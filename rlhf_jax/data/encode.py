"""Tokenise validated datasets into Python id lists, with explicit length limits.

Design choices, and why:
- Prompt and response are tokenised separately and concatenated, so the supervised boundary
  is exact (no merge straddles it) and the target mask is known by construction.
- BOS is prepended when the tokenizer asks for it (``add_bos_token`` and a ``bos_id``), once:
  a chat template that writes its own BOS is not given a second one.
- Lengths are a loud decision, never a silent one. ``on_overflow`` is ``"error"`` (default: a
  ``DataError`` naming file:line, the field, the length and the limit), ``"truncate"`` (cut
  the response; prompts are never truncated, and a row left with no target is an error) or
  ``"skip"`` (drop and count the row). A dataset left with no rows is an error.
- Outputs are Python lists: batching (``rlhf_jax.data.batching``) decides the array shapes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rlhf_jax.data.jsonl import DataError, Dataset, _where
from rlhf_jax.data.tokenizer import Tokenizer

ON_OVERFLOW = ("error", "truncate", "skip")


class Encoded(NamedTuple):
    """Encoded rows (in dataset order, skipped rows left out) and how many were skipped."""

    items: list
    skipped: int
    kept: tuple[int, ...] = ()
    """Indices into ``dataset.rows`` of ``items`` (filled by ``encode_prompts``, whose callers
    pass the rows' other columns on to reward functions)."""


def _check_args(on_overflow: str, **lengths: int) -> None:
    if on_overflow not in ON_OVERFLOW:
        raise ValueError(f"on_overflow must be one of {list(ON_OVERFLOW)}, got {on_overflow!r}")
    for name, value in lengths.items():
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_fmt(dataset: Dataset, allowed: tuple[str, ...], what: str) -> None:
    if dataset.fmt not in allowed:
        raise ValueError(f"{what} needs a dataset of format {' or '.join(map(repr, allowed))}; "
                         f"{dataset.path} was loaded as {dataset.fmt!r}")


def _bos(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.bos_id] if tokenizer.add_bos_token and tokenizer.bos_id is not None else []


def _chat(dataset: Dataset, i: int, tokenizer: Tokenizer, messages: list[dict[str, Any]],
          add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    """``encode_chat`` with BOS prepended as for plain text (unless the template wrote it)."""
    try:
        ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except (ValueError, TypeError) as e:  # template errors, unsafe templates
        raise DataError(f"{_where(dataset.path, dataset.line(i), 'messages')}"
                        f"cannot apply the chat template: {e}") from e
    bos = _bos(tokenizer)
    if bos and ids[:1] != bos:
        ids, mask = bos + ids, [0] + mask
    return ids, mask


def _no_rows(dataset: Dataset, skipped: int, limits: str) -> DataError:
    return DataError(f"{dataset.path}: no rows left: all {skipped} rows are longer than "
                     f"{limits} (on_overflow='skip')")


def _too_long(where: str, n: int, what: str, limit_name: str, limit: int, hint: str) -> DataError:
    return DataError(f"{where}{what} is {n} tokens, longer than {limit_name}={limit}; raise "
                     f"{limit_name} or pass {hint}")


def encode_sft(dataset: Dataset, tokenizer: Tokenizer, *, max_length: int,
               on_overflow: str = "error") -> Encoded:
    """``(ids, target_mask)`` per row of a ``prompt_completion`` or ``messages`` dataset.

    prompt_completion: ``ids = [BOS] + prompt + completion + [eos_ids[0]]``, the target mask
    1 on the completion and the EOS. messages: ``encode_chat`` ids and its assistant mask
    (assistant contents and their end-of-turn token), with BOS prepended likewise.

    Args:
      max_length: longest sequence ``T``; a longer one is handled by ``on_overflow``.
      on_overflow: ``"error"``, ``"truncate"`` (keep the first ``max_length`` tokens; error if
        no target token remains) or ``"skip"``.

    Returns:
      ``Encoded(items=[(ids, mask), ...], skipped)``; ``len(ids) == len(mask) <= max_length``.
    """
    _check_args(on_overflow, max_length=max_length)
    _check_fmt(dataset, ("prompt_completion", "messages"), "encode_sft")
    rows = dataset.rows
    if dataset.fmt == "prompt_completion":
        field = "completion"  # the sequence overflows; the completion is what gets cut
        bos, eos = _bos(tokenizer), tokenizer.eos_ids[0]
        prompts = tokenizer.batch_encode([r["prompt"] for r in rows])
        completions = tokenizer.batch_encode([r["completion"] for r in rows])
        seqs = [(bos + p + c + [eos], [0] * (len(bos) + len(p)) + [1] * (len(c) + 1))
                for p, c in zip(prompts, completions)]
    else:
        field = "messages"
        seqs = [_chat(dataset, i, tokenizer, r["messages"], False) for i, r in enumerate(rows)]
    items, skipped = [], 0
    for i, (ids, mask) in enumerate(seqs):
        where = _where(dataset.path, dataset.line(i), field)
        if not any(mask):
            raise DataError(f"{where}no supervised tokens: the chat template gives the "
                            f"assistant messages no tokens ({len(ids)} tokens in all)")
        if len(ids) > max_length:
            if on_overflow == "error":
                raise _too_long(where, len(ids), "the sequence", "max_length", max_length,
                                "on_overflow='truncate' or 'skip'")
            if on_overflow == "skip":
                skipped += 1
                continue
            if not any(mask[:max_length]):
                raise DataError(
                    f"{where}all supervised tokens truncated: the sequence is {len(ids)} tokens "
                    f"and its first target is token {mask.index(1) + 1}, beyond "
                    f"max_length={max_length}; raise max_length or pass on_overflow='skip'")
            ids, mask = ids[:max_length], mask[:max_length]
        items.append((ids, mask))
    if not items:
        raise _no_rows(dataset, skipped, f"max_length={max_length}")
    return Encoded(items, skipped)


def _prompt_error(dataset: Dataset, i: int, field: str, n: int, max_prompt_length: int
                  ) -> DataError:
    return DataError(f"{_where(dataset.path, dataset.line(i), field)}the prompt is {n} tokens "
                     f"(BOS and template included), longer than "
                     f"max_prompt_length={max_prompt_length}; prompts are never truncated: "
                     f"raise max_prompt_length or pass on_overflow='skip'")


def encode_preference(dataset: Dataset, tokenizer: Tokenizer, *, max_prompt_length: int,
                      max_length: int, on_overflow: str = "error") -> Encoded:
    """``(prompt_ids, chosen_ids, rejected_ids)`` per row of a ``preference`` dataset.

    ``prompt_ids = [BOS] + prompt``; the response ids are the response tokens + ``eos_ids[0]``.

    Args:
      max_prompt_length: longest prompt (never truncated: error, or skip the row).
      max_length: longest prompt + response, for chosen and rejected separately; a longer
        pair is handled by ``on_overflow`` (``"truncate"`` cuts the response, which then keeps
        at least one token).

    Returns:
      ``Encoded(items=[(prompt, chosen, rejected), ...], skipped)``.
    """
    _check_args(on_overflow, max_prompt_length=max_prompt_length, max_length=max_length)
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length="
                         f"{max_length}: a response needs at least one token")
    _check_fmt(dataset, ("preference",), "encode_preference")
    rows, bos, eos = dataset.rows, _bos(tokenizer), tokenizer.eos_ids[0]
    prompts = [bos + p for p in tokenizer.batch_encode([r["prompt"] for r in rows])]
    responses = {k: [x + [eos] for x in tokenizer.batch_encode([r[k] for r in rows])]
                 for k in ("chosen", "rejected")}
    items, skipped = [], 0
    for i, prompt in enumerate(prompts):
        if len(prompt) > max_prompt_length:
            if on_overflow != "skip":
                raise _prompt_error(dataset, i, "prompt", len(prompt), max_prompt_length)
            skipped += 1
            continue
        pair, skip = [], False
        for key in ("chosen", "rejected"):
            response = responses[key][i]
            n = len(prompt) + len(response)
            if n > max_length:
                if on_overflow == "error":
                    raise _too_long(_where(dataset.path, dataset.line(i), key), n,
                                    f"prompt + {key}", "max_length", max_length,
                                    "on_overflow='truncate' or 'skip'")
                if on_overflow == "skip":
                    skip = True
                    break
                response = response[:max_length - len(prompt)]  # >= 1 token: prompt < max
            pair.append(response)
        if skip:
            skipped += 1
            continue
        items.append((prompt, pair[0], pair[1]))
    if not items:
        raise _no_rows(dataset, skipped, f"max_prompt_length={max_prompt_length} or "
                                         f"max_length={max_length}")
    return Encoded(items, skipped)


def encode_prompts(dataset: Dataset, tokenizer: Tokenizer, *, max_prompt_length: int,
                   on_overflow: str = "error") -> Encoded:
    """Prompt ids per row, for generation (PPO, GRPO, best-of-n).

    ``prompt`` rows (and ``prompt_completion``/``preference`` rows, by their prompt):
    ``[BOS] + encode(prompt)``. ``messages`` rows: the conversation without a final assistant
    turn, through the chat template with ``add_generation_prompt=True`` (BOS as above).
    Prompts are never truncated: ``"truncate"`` behaves as ``"error"`` here.

    Returns:
      ``Encoded(items=[ids, ...], skipped)`` with ``1 <= len(ids) <= max_prompt_length``.
    """
    _check_args(on_overflow, max_prompt_length=max_prompt_length)
    rows = dataset.rows
    if dataset.fmt == "messages":
        field = "messages"
        prompts = []
        for i, row in enumerate(rows):
            messages = row["messages"]
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise DataError(f"{_where(dataset.path, dataset.line(i), field)}no prompt: the "
                                "conversation is a single assistant message")
            prompts.append(_chat(dataset, i, tokenizer, messages, True)[0])
    else:
        field = "prompt"
        bos = _bos(tokenizer)
        prompts = [bos + p for p in tokenizer.batch_encode([r["prompt"] for r in rows])]
    items, skipped, kept = [], 0, []
    for i, prompt in enumerate(prompts):
        if len(prompt) > max_prompt_length:
            if on_overflow != "skip":
                raise _prompt_error(dataset, i, field, len(prompt), max_prompt_length)
            skipped += 1
            continue
        items.append(prompt)
        kept.append(i)
    if not items:
        raise _no_rows(dataset, skipped, f"max_prompt_length={max_prompt_length}")
    return Encoded(items, skipped, tuple(kept))
