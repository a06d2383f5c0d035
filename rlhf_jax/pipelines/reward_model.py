"""Reward modelling: a scalar head trained on ``prompt``/``chosen``/``rejected`` pairs with the
Bradley–Terry loss ``-log sigmoid(r(x, y_w) - r(x, y_l))`` (Ouyang et al. 2022).

The reward is read at the last real token (the EOS closing the response). Chosen and rejected
sequences of a batch go through the model in one forward pass. Evaluation reports held-out
pairwise accuracy and the reward statistics (chosen / rejected / margin); the exported model
(``<run>/model``, a ``*ForSequenceClassification``-style checkpoint with ``score.weight``) is
what PPO, GRPO and best-of-n load as their reward model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.data import BatchIterator
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models import token_batch_rewards
from rlhf_jax.ops.stats import Mean
from rlhf_jax.pipelines.config import (ModelSpec, OptimizerConfig, SupervisedConfig,
                                       refuse_packing)
from rlhf_jax.pipelines.datasets import fixed_batches, load_pairs, row_length
from rlhf_jax.pipelines.run_dir import prepare_run_dir
from rlhf_jax.pipelines.setup import (base_generation, check_length_fits, load_model,
                                      make_mesh, with_adapter)
from rlhf_jax.pipelines.supervised import run_supervised, supervised_inputs
from rlhf_jax.train.supervised import SupervisedTask
from rlhf_jax.types import PreferenceBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class BradleyTerryConfig:
    """The reward model's loss."""

    margin: float | None = None
    """Constant margin subtracted from ``r_w - r_l`` (Llama 2 uses rating-dependent ones)."""
    center_coef: float = 0.0
    """Reward-centering penalty ``coef * (r_w + r_l)^2`` (Eisenstein et al. 2023)."""

    def __post_init__(self):
        if self.center_coef < 0:
            raise ValueError(f"algorithm.center_coef must be >= 0, got {self.center_coef}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelConfig(SupervisedConfig):
    """Bradley–Terry reward model on JSONL ``prompt``/``chosen``/``rejected`` pairs
    (``data.batch_size`` pairs per step)."""

    model: ModelSpec = ModelSpec()
    """Usually the SFT model's directory (the reward head starts at zero)."""
    algorithm: BradleyTerryConfig = BradleyTerryConfig()
    """The loss."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5, warmup_steps=10)
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""

    def __post_init__(self):
        super().__post_init__()
        refuse_packing(self.data)


def make_reward_loss(model, *, margin: float | None = None, center_coef: float = 0.0):
    """``loss_fn(params, PreferenceBatch, key)`` for the trainer: one forward over both sides."""

    def loss_fn(params, batch: PreferenceBatch, key):
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch.chosen, batch.rejected)
        r = token_batch_rewards(model, params, both)
        n = batch.chosen.tokens.shape[0]
        m = None if margin is None else jnp.full((n,), margin, jnp.float32)
        live = jnp.any(batch.chosen.loss_mask, -1)  # evaluation's filler pairs have none
        total, count, metrics = bradley_terry_loss(r[:n], r[n:], margin=m,
                                                   center_coef=center_coef, pair_mask=live)
        w = jnp.concatenate([live, live]).astype(jnp.float32)
        metrics["rewards/mean"] = Mean(jnp.sum(w * r), 2.0 * jnp.sum(live, dtype=jnp.float32))
        metrics["rewards/sq"] = Mean(jnp.sum(w * r * r), 2.0 * jnp.sum(live, dtype=jnp.float32))
        return total, count, metrics

    return loss_fn


def _with_std(out: dict) -> dict:
    out["rewards/std"] = max(out.pop("rewards/sq") - out["rewards/mean"] ** 2, 0.0) ** 0.5
    return out


def run(cfg: RewardModelConfig) -> dict:
    """Train and export the reward model; returns final train/eval metrics and paths."""
    tokenizer, train, evals, report = supervised_inputs(cfg, load_pairs, "model", cfg.model)
    generation = base_generation(cfg.model)
    # Every data and config check before the model is built or anything compiled.
    data = BatchIterator(train, batch_size=cfg.data.batch_size, seed=cfg.seed)
    batches = fixed_batches(evals, cfg.data.batch_size) if evals is not None else None
    mesh = make_mesh(cfg.mesh, cfg.data.batch_size)
    model, params = load_model(cfg.model, heads=("reward",), vocab_size=tokenizer.vocab_size,
                               seed=cfg.seed)
    check_length_fits({"model": model.config}, row_length(train, evals))
    model, params, adapted = with_adapter(cfg.model, model, params, seed=cfg.seed)
    # after every check above: a start refused for its config or data writes nothing
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    loss_fn = make_reward_loss(model, margin=cfg.algorithm.margin,
                               center_coef=cfg.algorithm.center_coef)
    task = SupervisedTask(loss_fn=loss_fn, data=data, eval_batches=batches, eval_post=_with_std,
                          postfix=("loss", "rewards/accuracy"))
    return run_supervised(cfg, task, run_dir=run_dir, model=model, params=params,
                          tokenizer=tokenizer, mesh=mesh, generation=generation, data_report=report,
                          adapted=adapted)


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.reward_model is `rlhf-jax reward-model`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["reward-model", *sys.argv[1:]]))
