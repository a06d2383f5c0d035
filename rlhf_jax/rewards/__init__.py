"""Rewards: RLVR verifiers that parse answers with a small grammar (never run them as code).

Reward functions have the TRL signature ``fn(prompts, completions, **columns) -> list[float]``;
``REWARD_FUNCTIONS`` is the table pipelines pick from by name.
"""

# reward-model scoring: see rlhf_jax.rewards.reward_model
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
    "exact_match",
    "exact_match_reward",
    "parse_expression",
    "parse_number",
    "with_time_limit",
]
