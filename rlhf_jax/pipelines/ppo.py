"""PPO against a reward model with a KL leash to a frozen reference (Ziegler et al. 2019;
Ouyang et al. 2022), as an ``OnPolicyAlgorithm`` of the shared engine (``train.onpolicy``).

What PPO defines:

* models: the policy (scored after sampling, with its entropy), the reference, a critic (a
  head on the policy, ``value_model="shared"``, or a separate model initialised from the reward
  model, ``"separate"`` as InstructGPT) and the reward model;
* advantages: the score at the last token, KL either in the per-token reward
  (``kl.mode="reward"``: ``r_t = -beta * k1_t``) or in the loss; GAE (whitened) and returns;
* loss: clipped policy loss + ``vf_coef`` x clipped value loss (+ entropy bonus, + ``beta``
  x the KL estimator when ``kl.mode="loss"``);
* state: the KL controller (fixed or adaptive), moved by the rollout's observed KL.

Sampling, scoring, the minibatch scan, shardings, the loop and checkpoints are the engine's.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import entropy_bonus, ppo_policy_loss, value_loss
from rlhf_jax.ops import (AGGREGATIONS, KL_CONTROLLERS, KL_ESTIMATORS, aggregate_loss,
                          gae_advantages, kl_controller_init, kl_k1, masked_whiten)
from rlhf_jax.ops.stats import Mean
from rlhf_jax.pipelines import onpolicy
from rlhf_jax.pipelines.config import KLConfig, ModelSpec, OnPolicyConfig, OptimizerConfig
from rlhf_jax.rewards import RewardFn
from rlhf_jax.train import Forward, OnPolicyAlgorithm
from rlhf_jax.types import Rollout


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOAlgorithmConfig:
    """PPO's own hyperparameters."""

    epochs: int = 2
    """Passes over each rollout."""
    num_minibatches: int = 4
    """Optimizer updates per pass (the rollout split into this many shuffled minibatches)."""
    discount: float = 1.0
    """Reward discount gamma of GAE."""
    gae_lambda: float = 0.95
    """GAE's lambda (bias-variance trade-off of the advantage estimate)."""
    clip_eps_low: float = 0.2
    """Lower clip range of the probability ratio."""
    clip_eps_high: float | None = None
    """Upper clip range (None: ``clip_eps_low``)."""
    dual_clip: float | None = None
    """Dual-clip constant for negative advantages (None: off)."""
    value_clip: float | None = 0.2
    """Clip range of the value update around the rollout's values (None: unclipped)."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus; 0 skips the update's entropy pass over the vocabulary
    (the logged ``entropy`` is the sampling policy's either way)."""
    whiten_advantages: bool = True
    """Whiten advantages over the rollout's tokens."""
    aggregation: str = "token_mean"
    """How token losses become the batch loss: a key of ``ops.AGGREGATIONS``."""
    value_model: str = "separate"
    """``separate`` (a critic initialised from ``value_init``) or ``shared`` (a policy head)."""

    def __post_init__(self):
        if self.value_model not in ("separate", "shared"):
            raise ValueError(f"algorithm.value_model must be 'separate' or 'shared', got "
                             f"{self.value_model!r}")
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError("algorithm.epochs and algorithm.num_minibatches must be >= 1")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"algorithm.aggregation must be one of {sorted(AGGREGATIONS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(OnPolicyConfig):
    """PPO with a reward model (``rewards.model``, required), a frozen reference and GAE."""

    value_init: ModelSpec | None = None
    """Separate critic's initialisation (default: the reward model, as InstructGPT)."""
    algorithm: PPOAlgorithmConfig = PPOAlgorithmConfig()
    """PPO's hyperparameters."""
    kl: KLConfig = KLConfig(coef=0.05, mode="reward")
    """The KL leash (PPO default: k1 in the per-token reward)."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-6, schedule="constant")
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""

    def __post_init__(self):
        super().__post_init__()
        if self.rewards.model is None:
            raise ValueError("PPO needs rewards.model (a reward-model checkpoint)")
        if self.data.batch_size % self.algorithm.num_minibatches:
            raise ValueError(f"data.batch_size {self.data.batch_size} is not divisible by "
                             f"algorithm.num_minibatches {self.algorithm.num_minibatches}")


def ppo_algorithm(a: PPOAlgorithmConfig, kl: KLConfig) -> OnPolicyAlgorithm:
    """PPO as advantages + loss + KL-controller update (see the module docstring), from the
    config's ``algorithm`` and ``kl`` blocks."""
    agg = dict(aggregation=a.aggregation)

    def advantages(ro: Rollout, algo_state):
        m = ro.mask
        k1 = jnp.where(m, kl_k1(ro.old_logp, ro.ref_logp), 0.0)
        n = jnp.sum(m, -1)
        last = jax.nn.one_hot(n - 1, m.shape[1]) * (n > 0)[:, None]
        rewards = ro.rewards[:, None] * last
        if kl.mode == "reward":
            rewards = rewards - algo_state.kl_coef * k1
        adv, ret = gae_advantages(rewards, ro.values, m, gamma=a.discount, lam=a.gae_lambda)
        if a.whiten_advantages:
            adv = masked_whiten(adv, m)
        seq_kl = jnp.mean(jnp.sum(k1, -1))
        return ro._replace(advantages=adv, returns=ret), {
            "kl_coef": algo_state.kl_coef, "non_score_reward": -algo_state.kl_coef * seq_kl}

    def loss(fwd: Forward, mb: Rollout, algo_state):
        pl, count, pm = ppo_policy_loss(fwd.logprobs, mb.old_logp, mb.advantages, mb.mask,
                                        clip_eps_low=a.clip_eps_low,
                                        clip_eps_high=a.clip_eps_high, dual_clip=a.dual_clip,
                                        **agg)
        vl, _, vm = value_loss(fwd.values, mb.values, mb.returns, mb.mask, clip_eps=a.value_clip,
                               **agg)
        total = pl + a.vf_coef * vl
        metrics = {f"policy/{k}": v for k, v in pm.items()}
        metrics |= {f"value/{k}": v for k, v in vm.items()}
        metrics |= {"policy_loss": Mean(pl, count), "value_loss": Mean(vl, count)}
        if a.entropy_coef != 0:  # the updated policy's entropy, under the bonus
            el, _, em = entropy_bonus(fwd.entropy, mb.mask, coef=a.entropy_coef, **agg)
            metrics |= {f"policy/{k}": v for k, v in em.items()}
            total = total + el
        if kl.mode == "loss":
            k = jnp.where(mb.mask, KL_ESTIMATORS[kl.estimator](fwd.logprobs, mb.ref_logp,
                                                                 mask=mb.mask), 0.0)
            kl_sum, _ = aggregate_loss(k, mb.mask, mode=a.aggregation)
            total = total + algo_state.kl_coef * kl_sum
            metrics["policy/kl"] = Mean(kl_sum, count)
        return total, count, metrics

    def next_algo_state(algo_state, observed_kl, rows: int):
        return KL_CONTROLLERS[kl.controller](algo_state, observed_kl=observed_kl, n_steps=rows,
                                             target=kl.target, horizon=kl.horizon)

    return OnPolicyAlgorithm(advantages=advantages, loss=loss, epochs=a.epochs,
                             num_minibatches=a.num_minibatches, score_old=True,
                             rollout_entropy=True, loss_entropy=a.entropy_coef != 0,
                             next_algo_state=next_algo_state)


def run(cfg: PPOConfig, *, reward_fns: Mapping[str, RewardFn] | None = None,
        reward_weights: Mapping[str, float] | None = None,
        eval_rewards: Mapping[str, RewardFn] | None = None) -> dict:
    """Train the policy with PPO. The reward is the reward model's score (plus any reward
    functions, weighted); ``eval_rewards`` (e.g. a task's gold scorer) are reported at every
    evaluation alongside the reward model's score and the KL to the reference."""
    prep = onpolicy.prepare(cfg, group_size=1)
    fns, weights = onpolicy.reward_functions(cfg, reward_fns, reward_weights)
    loaded = onpolicy.load_models(cfg, prep, value_model=cfg.algorithm.value_model,
                                  use_reference=True)
    rewards = onpolicy.engine_rewards(cfg, fns, weights)
    return onpolicy.run_onpolicy(
        cfg, ppo_algorithm(cfg.algorithm, cfg.kl), prep=prep, loaded=loaded, group_size=1,
        rewards=rewards,
        algo_state=kl_controller_init(cfg.kl.coef), eval_rewards=eval_rewards or {},
        greedy_eval=False, postfix=("reward", "kl"),
        result_extra=lambda s: {"kl_coef": float(np.asarray(s.algo.kl_coef))})


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.ppo is `rlhf-jax ppo`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["ppo", *sys.argv[1:]]))
