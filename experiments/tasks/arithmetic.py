"""Verifiable arithmetic for RL with verifiable rewards (RLVR), generated from a seed.

Format (one, fixed): the prompt is ``"What is 23+17? Answer:"`` and the answer text is the
integer result in decimal, ``"40"`` (``"-28"`` for ``12-40``); an SFT completion is the answer
with a leading space, ``" 40"``, so prompt + completion reads ``"What is 23+17? Answer: 40"``.
``rlhf_jax.rewards.verifiers.exact_match`` scores a completion against the answer.

Operands are uniform integers in [0, max_operand]; operators are drawn from ``ops`` (a subset
of ``"+-*"``). The SFT data is deliberately imperfect: a fixed fraction of its completions
(30% by default) are wrong by a small amount (+-1..3), so the SFT model is wrong sometimes and
RL against the verifier has room to improve it. Eval problems are distinct and never appear in
the SFT or RL-train files.

Files (``write_datasets``), JSON lines, UTF-8: sft.jsonl {prompt, completion, answer},
train_prompts.jsonl and eval_prompts.jsonl {prompt, answer}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from rlhf_jax.fileio import atomic_write

PROMPT_FORMAT = "What is {a}{op}{b}? Answer:"
WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _check(max_operand: int, ops: str) -> None:
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if not ops or any(op not in _APPLY for op in ops):
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")


def _problem(a: int, op: str, b: int) -> dict:
    return {"prompt": PROMPT_FORMAT.format(a=a, op=op, b=b), "answer": str(_APPLY[op](a, b))}


def _draw(rng: np.random.Generator, max_operand: int, ops: str) -> dict:
    a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
    return _problem(a, ops[rng.integers(len(ops))], b)


def make_problems(seed: int, n: int, *, max_operand: int = 50, ops: str = "+-") -> list[dict]:
    """``n`` rows ``{"prompt": "What is 23+17? Answer:", "answer": "40"}`` (repeats possible).

    >>> make_problems(0, 1, max_operand=9)[0]["prompt"].startswith("What is ")
    True
    """
    _check(max_operand, ops)
    rng = np.random.default_rng([seed, 0])
    return [_draw(rng, max_operand, ops) for _ in range(n)]


def _distinct(rng: np.random.Generator, n: int, max_operand: int, ops: str) -> list[dict]:
    total = (max_operand + 1) ** 2 * len(ops)
    if 2 * n > total:
        raise ValueError(f"n_eval={n} is more than half of the {total} distinct problems")
    rows, seen = [], set()
    while len(rows) < n:
        row = _draw(rng, max_operand, ops)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def _avoiding(rng: np.random.Generator, n: int, held_out: set, max_operand: int,
              ops: str) -> list[dict]:
    rows = []
    while len(rows) < n:  # terminates: held_out is at most half of all problems
        row = _draw(rng, max_operand, ops)
        if row["prompt"] not in held_out:
            rows.append(row)
    return rows


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
                               for row in rows))


def write_datasets(out_dir: str, *, seed: int = 0, n_sft: int = 2000, n_train: int = 2000,
                   n_eval: int = 256, wrong_fraction: float = 0.3, max_operand: int = 50,
                   ops: str = "+-") -> dict:
    """Write sft.jsonl, train_prompts.jsonl and eval_prompts.jsonl; byte-identical for a seed.

    Exactly ``round(wrong_fraction * n_sft)`` SFT completions are wrong, each by an offset from
    ``WRONG_OFFSETS``; the true answer stays in the row's ``answer`` field. Returns
    ``{"paths": {name: path}, "stats": {"sft_wrong_fraction", "n_sft", "n_train", "n_eval"}}``.
    """
    _check(max_operand, ops)
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    os.makedirs(out_dir, exist_ok=True)
    r_eval, r_sft, r_train = (np.random.default_rng([seed, i]) for i in (1, 2, 3))
    evals = _distinct(r_eval, n_eval, max_operand, ops)
    held_out = {row["prompt"] for row in evals}
    sft = _avoiding(r_sft, n_sft, held_out, max_operand, ops)
    n_wrong = round(wrong_fraction * n_sft)
    wrong = set(int(i) for i in r_sft.permutation(n_sft)[:n_wrong])
    for i, row in enumerate(sft):
        value = int(row["answer"])
        if i in wrong:
            value += WRONG_OFFSETS[r_sft.integers(len(WRONG_OFFSETS))]
        row["completion"] = f" {value}"
    train = _avoiding(r_train, n_train, held_out, max_operand, ops)
    files = {"sft": sft, "train_prompts": train, "eval_prompts": evals}
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], rows)
    stats = {"sft_wrong_fraction": n_wrong / max(n_sft, 1), "n_sft": n_sft, "n_train": n_train,
             "n_eval": n_eval}
    return {"paths": paths, "stats": stats}


def corpus(seed: int = 0, *, n: int = 4000, max_operand: int = 50, ops: str = "+-") -> list[str]:
    """Texts to train the BPE tokenizer on: full problems with answers, every digit and sign."""
    texts = [f"{row['prompt']} {row['answer']}"
             for row in make_problems(seed, n, max_operand=max_operand, ops=ops)]
    texts.append("0 1 2 3 4 5 6 7 8 9 + - * = ? Answer: What is")
    return texts
