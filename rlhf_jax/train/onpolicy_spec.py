"""What an on-policy run is made of (``train.onpolicy`` runs it): the models and where their
params live (``Models``), the algorithm's pure pieces (``OnPolicyAlgorithm``), how a
completion's reward is made (``Rewards``) and the updated policy's forward pass (``Forward``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax

from rlhf_jax.models import Model, combine
from rlhf_jax.rewards import RewardFn
from rlhf_jax.types import Rollout


class Forward(NamedTuple):
    """The updated policy on a minibatch: per completion token, 0 where masked."""

    logprobs: jax.Array
    entropy: jax.Array | None
    values: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Models:
    """The models of an on-policy run. ``policy`` (and ``critic``) train; the others are frozen
    and their params live in the engine's ``frozen`` dict under the same names."""

    policy: Model
    reference: Model | None = None
    """Scored for the KL leash; None: no reference pass at all."""
    reward: Model | None = None
    """Reward model scored on device."""
    critic: Model | None = None
    """A separate value model (params ``"value"``); None with ``shared_values`` or no critic."""
    shared_values: bool = False
    """The value head sits on the policy."""
    lora: bool = False
    """The policy is a LoRA model (``train.adapters``): its trained params are the adapter (and
    any head), its full params ``combine(frozen["base"], params["policy"])``."""
    reference_of_base: Callable[[Any], Any] | None = None
    """With ``lora``: the reference is the base with the adapter off, its params this function
    of ``frozen["base"]`` (``Adapted.reference``); no second copy of the weights exists."""
    critic_lora: bool = False
    """The critic is a LoRA adapter plus a value head on ``frozen["value_base"]``."""
    critic_on_policy_base: tuple[str, ...] | None = None
    """With ``critic_lora``: the critic's base is ``frozen["base"]`` itself, these top-level
    entries of it (a second adapter on the policy's base; no second copy)."""

    def configs(self) -> dict:
        return {k: m.config for k, m in vars(self).items() if isinstance(m, Model)}

    def policy_params(self, params, frozen):
        """The policy's full params from the trained ones (and the frozen base with LoRA)."""
        return combine(frozen["base"], params["policy"]) if self.lora else params["policy"]

    def critic_params(self, params, frozen):
        """The separate critic's full params (its adapter on its frozen base with LoRA)."""
        if not self.critic_lora:
            return params["value"]
        if self.critic_on_policy_base is not None:
            base = {k: frozen["base"][k] for k in self.critic_on_policy_base}
            return combine(base, params["value"])
        return combine(frozen["value_base"], params["value"])

    def reference_params(self, frozen):
        """The reference's params: its own, or the adapter-off base."""
        if self.reference_of_base is not None:
            return self.reference_of_base(frozen["base"])
        return frozen["reference"]

    def frozen_config(self, name: str):
        """The model config a frozen entry belongs to (``base``: the policy's, ``value_base``:
        the critic's)."""
        owner = {"base": self.policy, "value_base": self.critic}.get(name)
        return (owner if owner is not None else getattr(self, name)).config


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnPolicyAlgorithm:
    """What one on-policy algorithm defines (see the module docstring)."""

    advantages: Callable[[Rollout, Any], tuple[Rollout, dict]]
    """``(rollout with rewards, algo_state) -> (rollout with advantages [returns, live],
    metrics)``."""
    loss: Callable[[Forward, Rollout, Any], tuple]
    """``(forward, minibatch, algo_state) -> (loss_sum, count, metric accumulators)``; the
    minibatch's ``mask`` already excludes rows that are not ``live``."""
    epochs: int = 1
    """Passes over each rollout."""
    num_minibatches: int = 1
    """Optimizer updates per pass."""
    score_old: bool = True
    """Score the policy after sampling for the ratio's denominator. False (one update per
    rollout only): the update's own log-probs stand in (ratio 1), one forward pass fewer."""
    rollout_entropy: bool = False
    """Log the sampling policy's entropy (needs ``score_old``)."""
    loss_entropy: bool = False
    """The loss reads the updated policy's entropy (a second pass over the vocabulary)."""
    next_algo_state: Callable[[Any, jax.Array, int], Any] | None = None
    """``(algo_state, mean per-sequence KL, rollout rows) -> algo_state`` after the updates."""

    def __post_init__(self):
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError("epochs and num_minibatches must be >= 1")
        if not self.score_old and (self.epochs, self.num_minibatches) != (1, 1):
            raise ValueError("score_old=False needs one update per rollout")
        if self.rollout_entropy and not self.score_old:
            raise ValueError("rollout_entropy needs score_old (the entropy comes from that pass)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rewards:
    """How the scalar reward of a completion is made (``pipelines.RewardConfig``, resolved)."""

    functions: Mapping[str, RewardFn] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_weight: float = 1.0
    missing_eos_penalty: float = 0.0
    non_finite: str = "error"
    """A non-finite or missing reward: ``error``, or ``drop`` the completion (and its group)
    from the loss (``rewards.combine_rewards``)."""
    time_limit: float | None = None
    """Seconds per reward-function call (None: no limit)."""


__all__ = ["Forward", "Models", "OnPolicyAlgorithm", "Rewards"]
