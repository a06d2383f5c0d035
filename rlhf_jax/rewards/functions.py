"""Reward functions as plain callables (TRL's signature) and the table they are named from.

A reward function is ``fn(prompts=[...], completions=[...], **columns) -> floats``: the decoded
prompts and completions of a batch, and each extra dataset column as a list aligned with them.
Configs name functions as a key of ``REWARD_FUNCTIONS`` or as ``module:function`` (imported, never
evaluated as text).
"""

from __future__ import annotations

import importlib
from typing import Callable, Mapping, Sequence

import numpy as np

from rlhf_jax.rewards.verifiers import REWARD_FUNCTIONS

RewardFn = Callable[..., Sequence[float]]
"""TRL-style reward function: ``fn(prompts=[...], completions=[...], **columns) -> floats``."""


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


def call_reward_fns(fns: Mapping[str, RewardFn], prompts: list, completions: list[str],
                    columns: Mapping[str, list]) -> dict[str, np.ndarray]:
    """Run each reward function on decoded text; a function's failure names the function.

    As in TRL, conversational prompts (lists of messages) come with conversational completions:
    each decoded text becomes ``[{"role": "assistant", "content": text}]``.
    """
    if prompts and isinstance(prompts[0], list):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    out = {}
    for name, fn in fns.items():
        try:
            vals = np.asarray(fn(prompts=prompts, completions=completions, **columns), np.float32)
        except Exception as e:  # noqa: BLE001 - re-raised with the function's name
            raise RuntimeError(f"reward function {name!r} failed: {e}") from e
        if vals.shape != (len(completions),):
            raise ValueError(f"reward function {name!r} returned shape {vals.shape}, expected "
                             f"({len(completions)},)")
        out[name] = vals
    return out


__all__ = ["RewardFn", "resolve_reward_function", "call_reward_fns"]
