"""Knowledge distillation: the student matches the teacher's full next-token distributions on
the tokens of a dataset (Hinton et al. 2015; Agarwal et al. 2024 for the generalised JSD).

The teacher's logits are computed on the fly inside the compiled step (its params are an
argument of the step, never trained, never captured as constants). The loss covers the
supervised tokens of ``prompt``/``completion`` or ``messages`` rows; it is a row of
``losses.DISTILL_LOSSES``: forward KL ``KL(teacher || student)`` (mode-covering, the classic
choice), reverse KL ``KL(student || teacher)`` (mode-seeking) or the generalised JSD. Teacher
and student must share the tokenizer (same vocabulary).
"""

from __future__ import annotations

import dataclasses

import jax

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.losses import DISTILL_LOSSES
from rlhf_jax.models import token_batch_logits
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines.common import (ModelSpec, fit, fixed_batches, load_model,
                                       load_sft_batch, make_mesh, model_shardings,
                                       prepare_run_dir)
from rlhf_jax.train import LoopConfig, OptimizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Student <- teacher distillation on JSONL prompt/completion or messages data."""

    train_data: str
    tokenizer: str
    teacher: ModelSpec
    student: ModelSpec = ModelSpec()
    output_dir: str = "runs/distill"
    eval_data: str | None = None
    loss: str = "forward_kl"
    """A key of ``losses.DISTILL_LOSSES``."""
    temperature: float = 1.0
    jsd_beta: float = 0.5
    max_length: int = 64
    packing: bool = False
    batch_size: int = 32
    micro_batches: int = 1
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                 total_steps=200)
    loop: LoopConfig = LoopConfig(total_steps=200, log_every=10, eval_every=100,
                                  save_every=100)
    aggregation: str = "token_mean"
    on_overflow: str = "error"
    skip_invalid: bool = False
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (``parallel.MeshConfig``; default: every
    device data-parallel); None runs on one device. Not part of the run's identity: a run
    resumes on another mesh."""
    seed: int = 0

    def __post_init__(self):
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"loss must be one of {sorted(DISTILL_LOSSES)}, got {self.loss!r}")
        if self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches "
                             f"{self.micro_batches}")


def make_distill_loss(student, teacher, cfg: DistillConfig):
    """``loss_fn(params, TokenBatch, key, teacher_params)`` for ``make_train_step(frozen=...)``."""
    fn = DISTILL_LOSSES[cfg.loss]
    extra = {"beta": cfg.jsd_beta} if cfg.loss == "jsd" else {}

    def loss_fn(params, batch, key, teacher_params):
        s = token_batch_logits(student, params, batch)[:, :-1]
        t = jax.lax.stop_gradient(token_batch_logits(teacher, teacher_params, batch)[:, :-1])
        return fn(s, t, batch.loss_mask[:, 1:], temperature=cfg.temperature,
                  aggregation=cfg.aggregation, **extra)

    return loss_fn


def run(cfg: DistillConfig) -> dict:
    """Distil the teacher into the student; returns final metrics and paths."""
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    train = load_sft_batch(cfg.train_data, cfg, tokenizer)
    evals = load_sft_batch(cfg.eval_data, cfg, tokenizer) if cfg.eval_data else None
    # Every data and config check before the models are built or anything compiled.
    data = BatchIterator(train, batch_size=cfg.batch_size, seed=cfg.seed)
    batches = fixed_batches(evals, cfg.batch_size) if evals is not None else None
    mesh = make_mesh(cfg.mesh, cfg.batch_size)
    v = tokenizer.vocab_size
    teacher, teacher_params = load_model(cfg.teacher, heads=("lm",), vocab_size=v, seed=cfg.seed)
    student, params = load_model(cfg.student, heads=("lm",), vocab_size=v, seed=cfg.seed + 1)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher vocab {teacher.config.vocab_size} != student vocab "
                         f"{student.config.vocab_size}: distillation needs a shared tokenizer")
    return fit(cfg, run_dir=run_dir, tokenizer=tokenizer, model=student, params=params,
               loss_fn=make_distill_loss(student, teacher, cfg), data=data,
               eval_batches=batches, mesh=mesh, postfix=("loss",), frozen=teacher_params,
               frozen_shardings=model_shardings(mesh, teacher.config, teacher_params),
               tokens_in=lambda b: int(b.attention_mask.sum()))
