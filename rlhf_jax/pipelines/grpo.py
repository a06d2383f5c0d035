r"""Group-relative policy optimisation and its relatives, on rewards from Python functions,
verifiers or a reward model (Shao et al. 2024; Liu et al. 2025; Yu et al. 2025; Ahmadian et al.
2024; Hu 2025), as ``OnPolicyAlgorithm``\ s of the shared engine (``train.onpolicy``).

Each iteration samples ``group_size`` completions per prompt, scores them (reward functions see
decoded text, TRL-style: ``fn(prompts=..., completions=..., **columns)``; a reward model runs on
device), turns the rewards into advantages with the variant's estimator, and runs ``epochs x
num_minibatches`` clipped-surrogate updates. The variants are rows of ``VARIANTS``:

=============  ===================  =============================  ==========================
variant        advantage            aggregation                    extras
=============  ===================  =============================  ==========================
grpo           (r - mean) / std     sequence mean of token means   KL in the loss (k3)
dr_grpo        r - mean             token sum / max tokens         no std, no length bias
dapo           (r - mean) / std     token mean                     clip-higher 0.28, overlong
                                                                   filter, dynamic sampling
rloo           leave-one-out mean   token mean                     \-
reinforce_pp   batch-whitened r     token mean                     \-
=============  ===================  =============================  ==========================

Dynamic sampling keeps shapes fixed: groups whose rewards are all equal (zero advantage, no
signal) are masked out of the loss and its denominator instead of being re-sampled, which is
what removing them from the batch does to a token-mean loss; the fraction kept is logged.

With one update per rollout (``epochs == num_minibatches == 1`` and ``reuse_logprobs``, on by
default) the policy that sampled is the policy being updated, so the "old" log-probs are the
update's own: ``old = stop_gradient(logp)``, the ratio is exactly 1 and its gradient is the
policy gradient. The rollout then skips a scoring pass of the policy (as TRL does in that
case); the sampler-vs-trainer log-prob gap is measured inside the update instead. With
``overlap.max_staleness=1`` (one-step-off, ``train.overlap``) the rollout was sampled by the
previous params: the "old" log-probs are still the update's own (the proximal policy), and each
token's advantage carries the truncated importance weight ``min(pi_theta_t / pi_behav, C)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from rlhf_jax.losses import grpo_loss
from rlhf_jax.ops import group_advantages, reinforce_pp_advantages, rloo_advantages
from rlhf_jax.pipelines import onpolicy
from rlhf_jax.pipelines.config import KLConfig, OnPolicyConfig
from rlhf_jax.rewards import RewardFn
from rlhf_jax.train import Forward, OnPolicyAlgorithm
from rlhf_jax.types import Rollout


def _adv_group(r, mask, g):
    return group_advantages(r, group_size=g, scale_by_std=True)


def _adv_group_no_std(r, mask, g):
    return group_advantages(r, group_size=g, scale_by_std=False)


def _adv_rloo(r, mask, g):
    return rloo_advantages(r, group_size=g)


def _adv_reinforce_pp(r, mask, g):
    last = jax.nn.one_hot(jnp.sum(mask, -1) - 1, mask.shape[1])
    return reinforce_pp_advantages(r[:, None] * last, mask)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the variant table."""

    advantage: Callable
    aggregation: str
    clip_eps_high: float | None = None
    overlong_filter: bool = False
    dynamic_sampling: bool = False


VARIANTS: dict[str, Variant] = {
    "grpo": Variant(_adv_group, "seq_mean_token_mean"),
    "dr_grpo": Variant(_adv_group_no_std, "seq_mean_token_sum_norm"),
    "dapo": Variant(_adv_group, "token_mean", clip_eps_high=0.28, overlong_filter=True,
                    dynamic_sampling=True),
    "rloo": Variant(_adv_rloo, "token_mean"),
    "reinforce_pp": Variant(_adv_reinforce_pp, "token_mean"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOAlgorithmConfig:
    """The variant and its hyperparameters."""

    variant: str = "grpo"
    """A key of ``VARIANTS``: grpo, dr_grpo, dapo, rloo, reinforce_pp."""
    group_size: int = 8
    """Completions sampled per prompt (the group of the baseline); >= 2."""
    epochs: int = 1
    """Passes over each rollout (mu in the GRPO paper)."""
    num_minibatches: int = 1
    """Optimizer updates per pass."""
    reuse_logprobs: bool = True
    """With one update per rollout take the "old" log-probs from the update's own forward pass
    (ratio 1) instead of scoring the policy again after sampling (same numbers, slower)."""
    clip_eps_low: float = 0.2
    """Lower clip range of the probability ratio."""
    clip_eps_high: float | None = None
    """Upper clip range (None: the variant's, else ``clip_eps_low``)."""
    max_tokens: int | None = None
    """Normaliser of ``seq_mean_token_sum_norm`` (default ``sampling.max_new_tokens``)."""

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"algorithm.variant must be one of {sorted(VARIANTS)}, got "
                             f"{self.variant!r}")
        if self.group_size < 2:
            raise ValueError(f"algorithm.group_size must be >= 2 for group baselines, got "
                             f"{self.group_size}")
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError("algorithm.epochs and algorithm.num_minibatches must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(OnPolicyConfig):
    """Group-sampled policy optimisation with a variant from ``VARIANTS``."""

    algorithm: GRPOAlgorithmConfig = GRPOAlgorithmConfig()
    """The variant and its hyperparameters."""

    def __post_init__(self):
        super().__post_init__()
        rows = self.data.batch_size * self.algorithm.group_size
        if rows % self.algorithm.num_minibatches:
            raise ValueError(f"data.batch_size * algorithm.group_size = {rows} must be "
                             f"divisible by algorithm.num_minibatches "
                             f"{self.algorithm.num_minibatches}")
        if self.kl.mode != "loss" or self.kl.controller != "fixed":
            raise ValueError("GRPO keeps the KL in the loss with a fixed coefficient "
                             "(kl.mode='loss', kl.controller='fixed')")
        if self.sampling.temperature == 0:
            raise ValueError("sampling.temperature=0 samples every completion of a group alike "
                             "(greedy): the group-baseline advantages are then all 0 and "
                             "nothing trains; use a temperature > 0 (TRL's default is 1.0)")


def grpo_algorithm(a: GRPOAlgorithmConfig, kl: KLConfig, *,
                   max_new_tokens: int) -> OnPolicyAlgorithm:
    """The variant as advantages + loss (see the module docstring), from the config's
    ``algorithm`` and ``kl`` blocks and the completion budget (Dr.GRPO's normaliser)."""
    var, g = VARIANTS[a.variant], a.group_size
    clip_high = a.clip_eps_high if a.clip_eps_high is not None else var.clip_eps_high
    max_tokens = a.max_tokens or max_new_tokens
    use_ref = kl.coef > 0

    def advantages(ro: Rollout, algo_state):
        adv = var.advantage(ro.rewards, ro.mask, g)
        groups = ro.rewards.reshape(-1, g)
        live = jnp.ones(ro.rewards.shape, bool)
        if var.dynamic_sampling:
            live = jnp.repeat(jnp.max(groups, 1) > jnp.min(groups, 1), g)
        if var.overlong_filter:
            live = live & ~ro.truncated
        return (ro._replace(advantages=adv, live=live),
                {"reward_group_std": jnp.mean(jnp.std(groups, 1))})

    def loss(fwd: Forward, mb: Rollout, algo_state):
        total, count, metrics = grpo_loss(
            fwd.logprobs, mb.old_logp, mb.advantages, mb.mask,
            ref_logp=mb.ref_logp if use_ref else None, kl_coef=kl.coef,
            kl_estimator=kl.estimator, clip_eps_low=a.clip_eps_low, clip_eps_high=clip_high,
            aggregation=var.aggregation, max_tokens=max_tokens)
        return total, count, {f"policy/{k}": v for k, v in metrics.items()}

    one_update = (a.epochs, a.num_minibatches) == (1, 1)
    return OnPolicyAlgorithm(advantages=advantages, loss=loss, epochs=a.epochs,
                             num_minibatches=a.num_minibatches,
                             score_old=not (a.reuse_logprobs and one_update))


def run(cfg: GRPOConfig, *, reward_fns: Mapping[str, RewardFn] | None = None,
        reward_weights: Mapping[str, float] | None = None,
        eval_rewards: Mapping[str, RewardFn] | None = None) -> dict:
    """Train with the configured variant. The reward of a completion is
    ``sum_f w_f * f(...) + rewards.model_weight * RM(...)``: the configured
    ``rewards.functions`` plus the callables given here; eval (greedy) reports each function's
    mean (``eval_rewards`` when given)."""
    fns, weights = onpolicy.reward_functions(cfg, reward_fns, reward_weights)
    if not fns and cfg.rewards.model is None:
        raise ValueError("GRPO needs reward_fns (or rewards.functions) or a rewards.model")
    g = cfg.algorithm.group_size
    prep = onpolicy.prepare(cfg, group_size=g)
    loaded = onpolicy.load_models(cfg, prep, value_model=None, use_reference=cfg.kl.coef > 0)
    rewards = onpolicy.engine_rewards(cfg, fns, weights)
    return onpolicy.run_onpolicy(
        cfg, grpo_algorithm(cfg.algorithm, cfg.kl, max_new_tokens=cfg.sampling.max_new_tokens),
        prep=prep, loaded=loaded, group_size=g, rewards=rewards,
        eval_rewards=eval_rewards or fns,
        greedy_eval=True, postfix=("reward", "loss"))


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.grpo is `rlhf-jax grpo`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["grpo", *sys.argv[1:]]))
