"""Optax optimizer factory: AdamW, warmup + constant/linear/cosine schedules, global-norm clip.

Gradient accumulation is *not* an optimizer wrapper here: the step factory (``train.step``)
splits a batch into micro-batches and adds their loss sums, counts and gradients before dividing
once, so an accumulated step is the same update as the whole batch (``optax.MultiSteps`` averages
per-micro-batch means instead, which differs whenever micro-batches hold different token counts).
"""

from __future__ import annotations

import dataclasses
import math

import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with a learning-rate schedule and gradient clipping."""

    learning_rate: float = 1e-4
    """Peak learning rate."""
    schedule: str = "cosine"
    """After warmup: ``constant``, ``linear`` (to ``min_lr_ratio``) or ``cosine`` (likewise)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak (the schedule's length is the run's: ``LoopConfig``)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (linear and cosine)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    b1: float = 0.9
    """Adam's first-moment decay."""
    b2: float = 0.999
    """Adam's second-moment decay."""
    eps: float = 1e-8
    """Adam's denominator epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"learning_rate must be a finite number >= 0, got "
                             f"{self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0 or None")


def _constant(cfg: OptimizerConfig, decay_steps: int) -> optax.Schedule:
    return optax.constant_schedule(cfg.learning_rate)


def _linear(cfg: OptimizerConfig, decay_steps: int) -> optax.Schedule:
    return optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio,
                                 max(decay_steps, 1))


def _cosine(cfg: OptimizerConfig, decay_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(cfg.learning_rate, max(decay_steps, 1),
                                       alpha=cfg.min_lr_ratio)


SCHEDULES = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def check_schedule(cfg: OptimizerConfig, total_steps: int) -> None:
    """The warmup must fit in the run: ``0 <= warmup_steps <= total_steps``."""
    if cfg.warmup_steps > total_steps:
        raise ValueError(f"optimizer.warmup_steps {cfg.warmup_steps} exceeds the run's "
                         f"loop.total_steps {total_steps}; lower warmup_steps")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Warmup (if any) joined to the decay schedule named by ``cfg.schedule``, over the run's
    ``total_steps`` (``LoopConfig.total_steps``: the run length is stated once)."""
    check_schedule(cfg, total_steps)
    decay = SCHEDULES[cfg.schedule](cfg, total_steps - cfg.warmup_steps)
    if cfg.warmup_steps == 0:
        return decay
    warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (optional) then AdamW on the schedule of a ``total_steps`` run."""
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
