"""Axis-letter glossary and the array aliases used in signatures across rlhf_jax.

Axis letters (used in jaxtyping annotations such as ``Float[Array, "B T"]`` and in
``# [B, T]`` comments):

====  ===========================================================================
B     batch: sequences (or preference pairs) in a batch
G     group: completions sampled for one prompt (GRPO / RLOO)
N     number of prompts (``B = N * G`` for grouped data)
T     time: token positions of a sequence (completion positions for RL losses)
V     vocabulary
D     model (hidden) dimension
====  ===========================================================================

Conventions: ``mask`` arrays are 1 for tokens that count and 0 elsewhere, of any numeric or
boolean dtype; log-probabilities are float32; per-token quantities are aligned with the token
they score (the log-prob at ``t`` is ``log pi(y_t | y_<t)``).
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int

ArrayLike = Union[jax.Array, np.ndarray]
Mask = Union[Float[Array, "..."], Bool[Array, "..."], Int[Array, "..."]]

__all__ = ["Array", "ArrayLike", "Bool", "Float", "Int", "Mask"]


# --- batch pytrees (NamedTuples: pytrees with no Flax dependency) ---------------------------

from typing import NamedTuple  # noqa: E402


class TokenBatch(NamedTuple):
    """Sequences for teacher-forced training (SFT, reward/DPO inputs, distillation).

    Next-token convention: the model reads ``tokens`` and the logits at position ``t`` predict
    ``tokens[t + 1]``; ``loss_mask[t]`` marks ``tokens[t]`` as a *target* (so the loss uses
    ``loss_mask[:, 1:]`` against logits ``[:, :-1]``). Right-padded; for packed rows,
    ``segment_ids`` separates the documents and ``positions`` restart at 0 in each.
    """

    tokens: Int[Array, "B T"]
    loss_mask: Bool[Array, "B T"]
    attention_mask: Bool[Array, "B T"]
    segment_ids: Int[Array, "B T"]
    positions: Int[Array, "B T"]


class PreferenceBatch(NamedTuple):
    """Prompt + chosen and prompt + rejected sequences of the same pairs (``loss_mask`` on the
    response tokens only)."""

    chosen: TokenBatch
    rejected: TokenBatch


class PromptBatch(NamedTuple):
    """Left-padded prompts for generation (``rlhf_jax.sampling``)."""

    tokens: Int[Array, "B P"]
    mask: Bool[Array, "B P"]


class Rollout(NamedTuple):
    """One on-policy batch (``train.onpolicy``): ``B = prompts x group_size`` sampled completions
    and everything scored about them. Fields an algorithm does not use are None.

    Layout as in ``models.scoring``: ``prompt`` left-padded, ``completion`` right-padded with
    ``mask`` 1 up to and including the EOS; per-token arrays align with ``completion``.
    """

    prompt: Int[Array, "B P"]
    prompt_mask: Bool[Array, "B P"]
    completion: Int[Array, "B C"]
    mask: Bool[Array, "B C"]
    """Completion tokens, EOS included."""
    truncated: Bool[Array, " B"]
    """Rows that reached the length budget without an EOS."""
    sampler_logp: Float[Array, "B C"]
    """The sampler's log-probs of the completion tokens."""
    old_logp: Float[Array, "B C"]
    """The policy's log-probs at sampling time (the ratio's denominator); the sampler's when the
    policy is not scored again (one update per rollout)."""
    ref_logp: Float[Array, "B C"] | None = None
    """Frozen reference log-probs (None without a KL leash)."""
    values: Float[Array, "B C"] | None = None
    """Critic values at sampling time (None without a critic)."""
    entropy: Float[Array, "B C"] | None = None
    """The sampling policy's token entropy (None unless logged)."""
    rewards: Float[Array, " B"] | None = None
    """Scalar reward per completion (filled in by the update)."""
    advantages: Float[Array, "B C"] | Float[Array, " B"] | None = None
    returns: Float[Array, "B C"] | None = None
    live: Bool[Array, " B"] | None = None
    """Rows that count in the loss (dynamic sampling and overlong filters drop the others)."""


__all__ += ["TokenBatch", "PreferenceBatch", "PromptBatch", "Rollout"]


# --- the metric glossary -------------------------------------------------------------------

METRICS: dict[str, str] = {
    # every trained stage (the step and the loop)
    "loss": "the objective, divided once by its count over the whole batch (train and eval)",
    "grad_norm": "global gradient norm before clipping (mean over minibatches for RL)",
    "learning_rate": "the schedule's value at the step",
    "count": "the loss's denominator (tokens, sequences or pairs) in the step",
    "update_skipped": "optimizer updates skipped as non-finite (params left unchanged)",
    "tokens_per_s": "attended tokens per second since the previous log row",
    # SFT, distillation, ORPO
    "nll": "masked next-token negative log-likelihood (token mean)",
    "moe_aux_loss": "mixture-of-experts load-balancing term added to the loss "
                    "(router_aux_loss_coef * E * sum_e f_e P_e; SFT of a MoE model)",
    "forward_kl": "KL(teacher || student), token mean", "reverse_kl": "KL(student || teacher)",
    "jsd": "generalised Jensen-Shannon divergence to the teacher, token mean",
    "log_odds_ratio": "ORPO: log odds(chosen) - log odds(rejected)",
    "odds_ratio_loss": "ORPO: the odds-ratio term of the loss",
    # preference pairs (reward model, DPO family)
    "rewards/accuracy": "pairs whose chosen reward (RM score or DPO implicit reward) is higher",
    "rewards/chosen": "mean reward of the chosen responses",
    "rewards/rejected": "mean reward of the rejected responses",
    "rewards/margin": "mean reward(chosen) - reward(rejected)",
    "rewards/mean": "reward model: mean reward over both sides (eval)",
    "rewards/std": "reward model: std of the rewards over both sides (eval)",
    # on-policy rollouts (PPO, GRPO family) and their evaluation
    "reward": "mean scalar reward per completion: weighted reward functions + reward model - "
              "missing-EOS penalty (before any KL)",
    "reward_std": "std of the scalar reward over the rollout",
    "reward_group_std": "GRPO: mean over groups of the reward std within a group",
    "rewards/<name>": "mean of one reward component: a reward function by name, "
                      "``reward_model``, or an evaluation scorer (e.g. ``gold``)",
    "kl": "KL(policy || reference) per sequence, k1 estimate, mean over completions",
    "kl_coef": "PPO: the KL coefficient beta of the step (the controller's state)",
    "non_score_reward": "PPO: -beta x kl, the KL part of the per-token reward",
    "entropy": "mean token entropy of the sampling policy",
    "response_length": "mean completion tokens (EOS included)",
    "truncated_frac": "completions that hit the length budget without EOS",
    "kept_frac": "completions in the loss (dynamic sampling, overlong filter)",
    "rewards_dropped_frac": "completions left out of the loss for a non-finite or missing "
                            "reward (rewards.non_finite='drop'), with their groups",
    "reward_timeouts": "reward-function calls stopped by rewards.time_limit (their batch "
                       "scored 0)",
    "logprob_diff_sampler_trainer": "mean |sampler log-prob - trainer log-prob| per token",
    "offpolicy/<name>": "one-step-off rollouts (overlap.max_staleness=1), token means: "
                        "logprob_diff |log pi_theta_t - log pi_behaviour| (the staleness), "
                        "is_weight_mean the truncated importance weight min(pi_theta_t / "
                        "pi_behaviour, C), is_clipped_frac the tokens whose ratio exceeded C",
    "policy_loss": "PPO: clipped surrogate part of the loss",
    "value_loss": "PPO: clipped value part of the loss",
    "policy/<name>": "the policy loss's statistics under the updated params: clip_frac, "
                     "clip_frac_low, clip_frac_high, dual_clip_frac, approx_kl, ratio_mean, "
                     "ratio_max, ratio_min, kl (the KL estimator in the loss), entropy",
    "value/<name>": "the value loss's statistics: values, returns, explained_variance, "
                    "value_clip_frac",
}
"""Every metric name a pipeline logs (train and eval rows alike), with its meaning; ``<name>``
entries are families. Experiments and plots read these names."""


def is_glossary_metric(name: str) -> bool:
    """``name`` is in ``METRICS`` or in one of its ``prefix/<name>`` families."""
    if name in METRICS:
        return True
    prefix = name.split("/", 1)[0]
    return "/" in name and f"{prefix}/<name>" in METRICS


__all__ += ["METRICS", "is_glossary_metric"]
