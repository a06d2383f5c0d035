"""Reward functions as plain callables (TRL's signature) and the table they are named from.

A reward function is ``fn(prompts=[...], completions=[...], **columns) -> floats``: the decoded
prompts and completions of a batch, and each extra dataset column as a list aligned with them.
Configs name functions as a key of ``REWARD_FUNCTIONS`` or as ``module:function`` (imported, never
evaluated as text).

What a function may return, per completion, and what happens (nothing is silent):

* a real number (``int``, ``float``, ``bool``, a NumPy number): its value;
* ``None``: "does not apply" (TRL's convention): the completion's reward is the weighted sum of
  the functions that do apply; a completion no function applies to has no reward;
* NaN or +-inf, or a completion with no reward: an error naming the function and the
  completion by default; with ``non_finite="drop"`` the completion is left out of the loss and
  counted (``rewards_dropped_frac``);
* anything else (a string such as ``'1.5'``, a list): an error naming the function, the index
  and the type: values are never converted.

Each call runs under a time limit (``time_limit`` seconds, ``verifiers.call_limited``): a call
that overruns scores its whole batch 0 and is counted (``reward_timeouts``).
"""

from __future__ import annotations

import importlib
import numbers
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from rlhf_jax.rewards.verifiers import REWARD_FUNCTIONS, call_limited

RewardFn = Callable[..., Sequence[float]]
"""TRL-style reward function: ``fn(prompts=[...], completions=[...], **columns) -> floats``."""

NON_FINITE = ("error", "drop")
"""What a non-finite or missing reward does: stop the run, or leave the completion out."""


def resolve_reward_function(name: str) -> RewardFn:
    """A key of ``REWARD_FUNCTIONS``, or ``package.module:function`` imported by name."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: use one of "
                         f"{sorted(REWARD_FUNCTIONS)} or 'module:function'")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {name!r} cannot be imported: {e}") from e
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn


class RewardScores(NamedTuple):
    """Each function's rewards for a batch (``[B]`` float32, NaN where it returned None), where
    it returned a non-finite number, and how many of its calls hit the time limit."""

    values: dict[str, np.ndarray]
    non_finite: dict[str, np.ndarray]
    timeouts: dict[str, int]


def _as_rewards(name: str, raw, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(values with NaN for None, non-finite mask)``; anything but numbers and None raises."""
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__") or len(raw) != n:
        got = (f"length {len(raw)}" if hasattr(raw, "__len__") and not isinstance(
            raw, (str, bytes)) else type(raw).__name__)
        raise ValueError(f"reward function {name!r} returned {got}, expected {n} rewards (one "
                         f"per completion)")
    values = np.full(n, np.nan, np.float32)
    for i, v in enumerate(raw):
        if v is None:
            continue
        if not isinstance(v, (numbers.Real, np.bool_)) or isinstance(v, (str, bytes)):
            raise TypeError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) for "
                            f"completion {i}: a reward is a number, or None when the function "
                            f"does not apply; values are never converted")
        values[i] = float(v)
    bad = np.array([v is not None and not np.isfinite(float(v)) for v in raw], dtype=bool)
    return values, bad


def call_reward_fns(fns: Mapping[str, RewardFn], prompts: list, completions: list[str],
                    columns: Mapping[str, list], *,
                    time_limit: float | None = None) -> RewardScores:
    """Run each reward function on decoded text (under ``time_limit`` seconds per call); a
    function's failure names the function.

    As in TRL, conversational prompts (lists of messages) come with conversational completions:
    each decoded text becomes ``[{"role": "assistant", "content": text}]``.
    """
    if prompts and isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    n = len(completions)
    values, non_finite, timeouts = {}, {}, {}
    for name, fn in fns.items():
        kwargs = dict(prompts=prompts, completions=completions, **columns)
        try:
            if time_limit is None:
                finished, raw = True, fn(**kwargs)
            else:
                finished, raw = call_limited(fn, time_limit, (), kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with the function's name
            raise RuntimeError(f"reward function {name!r} failed: {e}") from e
        timeouts[name] = 0 if finished else 1
        if not finished:
            raw = [0.0] * n
        values[name], non_finite[name] = _as_rewards(name, raw, n)
    return RewardScores(values, non_finite, timeouts)


def combine_rewards(scores: RewardScores, weights: Mapping[str, float], prompts: list, *,
                    non_finite: str, has_model: bool) -> np.ndarray:
    """The weighted sum ``[B]`` of the functions that apply to each completion (float32).

    A completion with a non-finite reward, or (without a reward model) with no applicable
    function, is an error when ``non_finite="error"``; with ``"drop"`` its total is NaN (the
    update leaves it out of the loss).
    """
    n = len(prompts)
    total, applies = np.zeros(n, np.float32), np.zeros(n, bool)
    bad = np.zeros(n, bool)
    for name, v in scores.values.items():
        ok = np.isfinite(v)
        total += np.where(ok, float(weights.get(name, 1.0)) * np.where(ok, v, 0.0), 0.0)
        applies |= ok
        bad |= scores.non_finite[name]
    missing = ~applies & (not has_model) & bool(scores.values)
    if non_finite == "error" and (bad.any() or missing.any()):
        i = int(np.flatnonzero(bad | missing)[0])
        if bad[i]:
            name = next(k for k, m in scores.non_finite.items() if m[i])
            what = f"reward function {name!r} returned a non-finite reward"
        else:
            what = "every reward function returned None (does not apply)"
        raise ValueError(f"{what} for completion {i} (prompt {str(prompts[i])[:80]!r}); "
                         f"rewards must be finite numbers. Fix the function, or set "
                         f"rewards.non_finite='drop' to leave such completions out of the loss "
                         f"(counted as rewards_dropped_frac)")
    return np.where(bad | missing, np.float32(np.nan), total)


def nan_means(scores: RewardScores) -> dict[str, float]:
    """Each function's mean over the completions it applies to (NaN if none)."""
    out = {}
    for k, v in scores.values.items():
        ok = np.isfinite(v)
        out[k] = float(v[ok].mean()) if ok.any() else float("nan")
    return out


__all__ = ["NON_FINITE", "RewardFn", "RewardScores", "call_reward_fns", "combine_rewards",
           "nan_means", "resolve_reward_function"]
