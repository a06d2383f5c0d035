"""Rewards: RLVR verifiers that parse answers with a small grammar (never run them as code).

Reward functions have the TRL signature ``fn(prompts, completions, **columns) -> list[float]``;
``REWARD_FUNCTIONS`` is the table configs name them from (``rewards.functions``).
"""

from rlhf_jax.rewards.functions import RewardFn, call_reward_fns, resolve_reward_function
from rlhf_jax.rewards.verifiers import (
    REWARD_FUNCTIONS,
    exact_match,
    exact_match_reward,
    parse_expression,
    parse_number,
    with_time_limit,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardFn",
    "call_reward_fns",
    "exact_match",
    "exact_match_reward",
    "parse_expression",
    "parse_number",
    "resolve_reward_function",
    "with_time_limit",
]
