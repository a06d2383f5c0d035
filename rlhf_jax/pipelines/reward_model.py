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

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.losses import bradley_terry_loss
from rlhf_jax.models import token_batch_rewards
from rlhf_jax.ops.stats import Mean
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines.common import (ModelSpec, fit, fixed_batches, load_model, load_pairs,
                                       make_mesh, prepare_run_dir)
from rlhf_jax.train import LoopConfig, OptimizerConfig
from rlhf_jax.types import PreferenceBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelConfig:
    """Bradley–Terry reward model on JSONL preference pairs."""

    train_data: str
    """JSONL with ``prompt``, ``chosen``, ``rejected``."""
    tokenizer: str
    output_dir: str = "runs/reward_model"
    eval_data: str | None = None
    model: ModelSpec = ModelSpec()
    """Usually the SFT model's directory (the reward head starts at zero)."""
    max_prompt_length: int = 24
    max_length: int = 48
    batch_size: int = 32
    """Pairs per step."""
    micro_batches: int = 1
    margin: float | None = None
    """Constant margin subtracted from ``r_w - r_l`` (Llama 2 uses rating-dependent ones)."""
    center_coef: float = 0.0
    """Reward-centering penalty ``coef * (r_w + r_l)^2`` (Eisenstein et al. 2023)."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-4, warmup_steps=10,
                                                 total_steps=200, weight_decay=0.0)
    loop: LoopConfig = LoopConfig(total_steps=200, log_every=10, eval_every=100,
                                  save_every=100)
    on_overflow: str = "truncate"
    skip_invalid: bool = False
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (``parallel.MeshConfig``; default: every
    device data-parallel); None runs on one device. Not part of the run's identity: a run
    resumes on another mesh."""
    seed: int = 0

    def __post_init__(self):
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches "
                             f"{self.micro_batches}")


def make_reward_loss(model, *, margin: float | None = None, center_coef: float = 0.0):
    """``loss_fn(params, PreferenceBatch, key)`` for the trainer: one forward over both sides."""

    def loss_fn(params, batch: PreferenceBatch, key):
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch.chosen, batch.rejected)
        r = token_batch_rewards(model, params, both)
        n = batch.chosen.tokens.shape[0]
        m = None if margin is None else jnp.full((n,), margin, jnp.float32)
        total, count, metrics = bradley_terry_loss(r[:n], r[n:], margin=m,
                                                   center_coef=center_coef)
        metrics["rewards/mean"] = Mean(jnp.sum(r), jnp.asarray(2.0 * n))
        metrics["rewards/sq"] = Mean(jnp.sum(r * r), jnp.asarray(2.0 * n))
        return total, count, metrics

    return loss_fn


def run(cfg: RewardModelConfig) -> dict:
    """Train and export the reward model; returns final train/eval metrics and paths."""
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    train = load_pairs(cfg.train_data, cfg, tokenizer)
    evals = load_pairs(cfg.eval_data, cfg, tokenizer) if cfg.eval_data else None
    # Every data and config check before the model is built or anything compiled.
    data = BatchIterator(train, batch_size=cfg.batch_size, seed=cfg.seed)
    batches = fixed_batches(evals, cfg.batch_size) if evals is not None else None
    mesh = make_mesh(cfg.mesh, cfg.batch_size)
    model, params = load_model(cfg.model, heads=("reward",), vocab_size=tokenizer.vocab_size,
                               seed=cfg.seed)
    loss_fn = make_reward_loss(model, margin=cfg.margin, center_coef=cfg.center_coef)

    def with_std(out: dict) -> dict:
        out["rewards/std"] = max(out.pop("rewards/sq") - out["rewards/mean"] ** 2, 0.0) ** 0.5
        return out

    return fit(cfg, run_dir=run_dir, tokenizer=tokenizer, model=model, params=params,
               loss_fn=loss_fn, data=data, eval_batches=batches, mesh=mesh,
               postfix=("loss", "accuracy"), eval_post=with_std)
