"""Tokenise validated datasets into Python id lists, with the chat template and explicit limits.

Design choices, and why:
- Standard rows (strings) are text: ``[BOS] + prompt`` and ``response + [EOS]``, tokenised
  separately and concatenated, so the supervised boundary is exact (no merge straddles it).
- Conversational rows go through the chat template, as TRL renders them: the prompt with the
  generation prompt (``<|im_start|>assistant\\n``), the response as the assistant turn(s) up to
  and including the template's end-of-turn token (an EOS id is appended only if the template
  ends the turn without one). The response is what follows the prompt's own rendering inside
  the full conversation's; a template that renders the prompt differently once a response
  follows it is an error, never a silently shifted boundary.
- BOS is prepended when the tokenizer asks for it (``add_bos_token`` and a ``bos_id``), once:
  a chat template that writes its own BOS is not given a second one.
- Lengths are a loud decision, never a silent one. ``on_overflow`` is ``"error"`` (default: a
  ``DataError`` naming file:line, the field, the length and the limit), ``"truncate"`` (cut
  the response, counted in ``Encoded.truncated``; prompts are never truncated, and a row left
  with no target is an error) or ``"skip"`` (drop and count the row). A dataset left with no
  rows is an error.
- Outputs are Python lists: batching (``rlhf_jax.data.batching``) decides the array shapes.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from rlhf_jax.data.formats import RowError, preference_parts, prompt_of
from rlhf_jax.data.jsonl import DataError, Dataset, _where
from rlhf_jax.data.tokenizer import Tokenizer

ON_OVERFLOW = ("error", "truncate", "skip")


class Encoded(NamedTuple):
    """Encoded rows (in dataset order, skipped rows left out) and what was skipped or cut."""

    items: list
    skipped: int
    kept: tuple[int, ...] = ()
    """Indices into ``dataset.rows`` of ``items`` (callers pass the rows' other columns on to
    reward functions)."""
    truncated: int = 0
    """Rows whose response was cut to the length limit (``on_overflow="truncate"``)."""
    prompts: tuple = ()
    """``encode_prompts``: each item's prompt as given (a string or a conversation), for the
    reward functions' ``prompts`` argument."""


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


def _located(dataset: Dataset, i: int, field: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with a row's or a template's complaint raised as a ``DataError`` at its line."""
    try:
        return fn()
    except RowError as e:
        raise DataError(f"{_where(dataset.path, dataset.line(i), e.field)}{e.message}") from e
    except (ValueError, TypeError) as e:  # template errors, unsafe templates
        if isinstance(e, DataError):
            raise
        raise DataError(f"{_where(dataset.path, dataset.line(i), field)}cannot apply the chat "
                        f"template: {e}") from e


def encode_chat(tokenizer: Tokenizer, messages: list, *, add_generation_prompt: bool
                ) -> tuple[list[int], list[int]]:
    """``Tokenizer.encode_chat`` with BOS prepended as for plain text (unless the template
    wrote it): ``(ids, assistant mask)``."""
    ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    bos = _bos(tokenizer)
    if bos and ids[:1] != bos:
        ids, mask = bos + ids, [0] + mask
    return ids, mask


def _with_eos(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    return ids if ids and ids[-1] in tokenizer.eos_ids else ids + [tokenizer.eos_ids[0]]


def chat_pair(tokenizer: Tokenizer, prompt: list, response: list) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)`` of a conversational prompt and its assistant response(s).

    The prompt is rendered with the generation prompt; the response is what follows it in the
    full conversation's rendering, through the last assistant token (its end-of-turn).
    """
    prompt_ids = encode_chat(tokenizer, prompt, add_generation_prompt=True)[0]
    ids, mask = encode_chat(tokenizer, prompt + response, add_generation_prompt=False)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the template renders the prompt differently once a response follows "
                         "it (the generation-prompt rendering is not a prefix of the full "
                         "conversation's), so prompt and response cannot be split")
    end = max((k + 1 for k, m in enumerate(mask) if m), default=0)
    if end <= len(prompt_ids):
        raise ValueError("the template gives the response no assistant tokens")
    return prompt_ids, _with_eos(tokenizer, ids[len(prompt_ids):end])


def _pairs(dataset: Dataset, tokenizer: Tokenizer, prompts: list, responses: list,
           field: str) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` per row: strings batch-encoded, conversations templated."""
    if dataset.conversational:
        return [_located(dataset, i, field, lambda p=p, r=r: chat_pair(tokenizer, p, r))
                for i, (p, r) in enumerate(zip(prompts, responses))]
    bos = _bos(tokenizer)
    return [(bos + p, _with_eos(tokenizer, r)) for p, r in zip(
        tokenizer.batch_encode(prompts), tokenizer.batch_encode(responses))]


def _no_rows(dataset: Dataset, skipped: int, limits: str) -> DataError:
    return DataError(f"{dataset.path}: no rows left: all {skipped} rows are longer than "
                     f"{limits} (on_overflow='skip')")


def _too_long(where: str, n: int, what: str, limit_name: str, limit: int, hint: str) -> DataError:
    return DataError(f"{where}{what} is {n} tokens, longer than {limit_name}={limit}; raise "
                     f"{limit_name} or pass {hint}")


def _sft_sequences(dataset: Dataset, tokenizer: Tokenizer) -> tuple[list, str]:
    """``([(ids, target mask), ...], the field an overflow is reported on)``."""
    rows = dataset.rows
    if dataset.fmt == "text":
        bos, eos = _bos(tokenizer), tokenizer.eos_ids[0]
        seqs = [(bos + t + [eos], [0] * len(bos) + [1] * (len(t) + 1))
                for t in tokenizer.batch_encode([r["text"] for r in rows])]
        return seqs, "text"
    if dataset.fmt == "prompt_completion":
        pairs = _pairs(dataset, tokenizer, [r["prompt"] for r in rows],
                       [r["completion"] for r in rows], "completion")
        return [(p + c, [0] * len(p) + [1] * len(c)) for p, c in pairs], "completion"
    seqs = [_located(dataset, i, "messages", lambda r=r: encode_chat(
        tokenizer, r["messages"], add_generation_prompt=False)) for i, r in enumerate(rows)]
    return seqs, "messages"


def encode_sft(dataset: Dataset, tokenizer: Tokenizer, *, max_length: int,
               on_overflow: str = "error") -> Encoded:
    """``(ids, target_mask)`` per row of a ``text``, ``prompt_completion`` or ``messages`` set.

    text: ``[BOS] + text + [EOS]``, every token but BOS a target. prompt_completion: prompt and
    completion as the module docstring says, the target mask 1 on the completion (its EOS or
    end-of-turn included). messages: the chat template's ids and its assistant mask (assistant
    contents and their end-of-turn token).

    Args:
      max_length: longest sequence ``T``; a longer one is handled by ``on_overflow``.
      on_overflow: ``"error"``, ``"truncate"`` (keep the first ``max_length`` tokens; error if
        no target token remains) or ``"skip"``.

    Returns:
      ``Encoded(items=[(ids, mask), ...], skipped, truncated=...)``;
      ``len(ids) == len(mask) <= max_length``.
    """
    _check_args(on_overflow, max_length=max_length)
    _check_fmt(dataset, ("text", "prompt_completion", "messages"), "encode_sft")
    seqs, field = _sft_sequences(dataset, tokenizer)
    items, skipped, truncated = [], 0, 0
    for i, (ids, mask) in enumerate(seqs):
        where = _where(dataset.path, dataset.line(i), field)
        if not any(mask):
            raise DataError(f"{where}no supervised tokens: the conversation has no assistant "
                            f"message with tokens ({len(ids)} tokens in all)")
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
            truncated += 1
        items.append((ids, mask))
    if not items:
        raise _no_rows(dataset, skipped, f"max_length={max_length}")
    return Encoded(items, skipped, truncated=truncated)


def _prompt_error(dataset: Dataset, i: int, field: str, n: int, max_prompt_length: int
                  ) -> DataError:
    how = "rendered with the chat template" if dataset.conversational else "BOS included"
    return DataError(f"{_where(dataset.path, dataset.line(i), field)}the prompt is {n} tokens "
                     f"({how}), longer than max_prompt_length={max_prompt_length}; prompts "
                     f"are never truncated: raise max_prompt_length or pass "
                     f"on_overflow='skip'")


def _fit_response(dataset: Dataset, i: int, key: str, prompt: list[int], response: list[int],
                  max_length: int, on_overflow: str) -> list[int] | None:
    """``response`` within ``max_length`` with its prompt: as is, cut, or None (skip)."""
    n = len(prompt) + len(response)
    if n <= max_length:
        return response
    if on_overflow == "error":
        raise _too_long(_where(dataset.path, dataset.line(i), key), n, f"prompt + {key}",
                        "max_length", max_length, "on_overflow='truncate' or 'skip'")
    return None if on_overflow == "skip" else response[:max_length - len(prompt)]


def encode_preference(dataset: Dataset, tokenizer: Tokenizer, *, max_prompt_length: int,
                      max_length: int, on_overflow: str = "error") -> Encoded:
    """``(prompt_ids, chosen_ids, rejected_ids)`` per row of a ``preference`` dataset.

    Explicit or implicit prompt (``formats.preference_parts``), strings or conversations (see
    the module docstring): each response ends with its EOS / end-of-turn token.

    Args:
      max_prompt_length: longest prompt (never truncated: error, or skip the row).
      max_length: longest prompt + response, for chosen and rejected separately; a longer
        pair is handled by ``on_overflow`` (``"truncate"`` cuts the response, which then keeps
        at least one token).

    Returns:
      ``Encoded(items=[(prompt, chosen, rejected), ...], skipped, truncated=...)``.
    """
    _check_args(on_overflow, max_prompt_length=max_prompt_length, max_length=max_length)
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length="
                         f"{max_length}: a response needs at least one token")
    _check_fmt(dataset, ("preference",), "encode_preference")
    parts = [_located(dataset, i, "chosen", lambda r=r: preference_parts(r))
             for i, r in enumerate(dataset.rows)]
    prompts = [p for p, _, _ in parts]
    chosen = _pairs(dataset, tokenizer, prompts, [c for _, c, _ in parts], "chosen")
    rejected = _pairs(dataset, tokenizer, prompts, [r for _, _, r in parts], "rejected")
    items, skipped, truncated = [], 0, 0
    for i, ((prompt, c), (_, r)) in enumerate(zip(chosen, rejected)):
        if len(prompt) > max_prompt_length:
            if on_overflow != "skip":
                raise _prompt_error(dataset, i, "prompt", len(prompt), max_prompt_length)
            skipped += 1
            continue
        fit = [_fit_response(dataset, i, key, prompt, resp, max_length, on_overflow)
               for key, resp in (("chosen", c), ("rejected", r))]
        if None in fit:
            skipped += 1
            continue
        truncated += fit != [c, r]
        items.append((prompt, *fit))
    if not items:
        raise _no_rows(dataset, skipped, f"max_prompt_length={max_prompt_length} or "
                                         f"max_length={max_length}")
    return Encoded(items, skipped, truncated=truncated)


def _prompt_ids(dataset: Dataset, tokenizer: Tokenizer, prompts: list, field: str) -> list:
    if dataset.conversational:
        return [_located(dataset, i, field, lambda p=p: encode_chat(
            tokenizer, p, add_generation_prompt=True)[0]) for i, p in enumerate(prompts)]
    bos = _bos(tokenizer)
    return [bos + p for p in tokenizer.batch_encode(prompts)]


def encode_prompts(dataset: Dataset, tokenizer: Tokenizer, *, max_prompt_length: int,
                   on_overflow: str = "error") -> Encoded:
    """Prompt ids per row, for generation (PPO, GRPO, best-of-n, evaluation).

    Any format with a prompt (``formats.prompt_of``): a string is ``[BOS] + encode(prompt)``; a
    conversation (a ``messages`` row without its final assistant turn) goes through the chat
    template with the generation prompt, so the model's first token follows the assistant
    header. Prompts are never truncated: ``"truncate"`` behaves as ``"error"`` here.

    Returns:
      ``Encoded(items=[ids, ...], skipped, kept, prompts=...)`` with
      ``1 <= len(ids) <= max_prompt_length``.
    """
    _check_args(on_overflow, max_prompt_length=max_prompt_length)
    field = "messages" if dataset.fmt == "messages" else "prompt"
    values = [_located(dataset, i, field, lambda r=r: prompt_of(r, dataset.fmt))
              for i, r in enumerate(dataset.rows)]
    items, skipped, kept = [], 0, []
    for i, prompt in enumerate(_prompt_ids(dataset, tokenizer, values, field)):
        if len(prompt) > max_prompt_length:
            if on_overflow != "skip":
                raise _prompt_error(dataset, i, field, len(prompt), max_prompt_length)
            skipped += 1
            continue
        items.append(prompt)
        kept.append(i)
    if not items:
        raise _no_rows(dataset, skipped, f"max_prompt_length={max_prompt_length}")
    return Encoded(items, skipped, tuple(kept), prompts=tuple(values[i] for i in kept))


def encode_unpaired(dataset: Dataset, tokenizer: Tokenizer, *, max_prompt_length: int,
                    max_length: int, on_overflow: str = "error") -> Encoded:
    """``(prompt_ids, completion_ids, label)`` per row of an ``unpaired_preference`` dataset
    (KTO's data: one response judged desirable or not). Lengths as ``encode_preference``."""
    _check_args(on_overflow, max_prompt_length=max_prompt_length, max_length=max_length)
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be < max_length="
                         f"{max_length}: a response needs at least one token")
    _check_fmt(dataset, ("unpaired_preference",), "encode_unpaired")
    rows = dataset.rows
    pairs = _pairs(dataset, tokenizer, [r["prompt"] for r in rows],
                   [r["completion"] for r in rows], "completion")
    items, skipped, truncated = [], 0, 0
    for i, (prompt, completion) in enumerate(pairs):
        if len(prompt) > max_prompt_length:
            if on_overflow != "skip":
                raise _prompt_error(dataset, i, "prompt", len(prompt), max_prompt_length)
            skipped += 1
            continue
        fit = _fit_response(dataset, i, "completion", prompt, completion, max_length,
                            on_overflow)
        if fit is None:
            skipped += 1
            continue
        truncated += fit != completion
        items.append((prompt, fit, rows[i]["label"]))
    if not items:
        raise _no_rows(dataset, skipped, f"max_prompt_length={max_prompt_length} or "
                                         f"max_length={max_length}")
    return Encoded(items, skipped, truncated=truncated)
