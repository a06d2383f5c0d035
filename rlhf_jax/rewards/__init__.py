"""Rewards: RLVR verifiers that parse answers with a small grammar (never run them as code).

Reward functions have the TRL signature ``fn(prompts, completions, **columns) -> list[float]``;
``REWARD_FUNCTIONS`` is the table configs name them from (``rewards.functions``).
"""

from rlhf_jax.rewards.functions import (NON_FINITE, RewardFn, RewardScores, call_reward_fns,
                                        combine_rewards, nan_means, resolve_reward_function)
from rlhf_jax.rewards.verifiers import (
    REWARD_FUNCTIONS,
    exact_match,
    exact_match_reward,
    parse_expression,
    parse_number,
    with_time_limit,
)

__all__ = [
    "NON_FINITE",
    "REWARD_FUNCTIONS",
    "RewardFn",
    "RewardScores",
    "call_reward_fns",
    "combine_rewards",
    "nan_means",
    "exact_match",
    "exact_match_reward",
    "parse_expression",
    "parse_number",
    "resolve_reward_function",
    "with_time_limit",
]
