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

from rlhf_jax.data import BatchIterator
from rlhf_jax.losses import DISTILL_LOSSES
from rlhf_jax.models import token_batch_logits
from rlhf_jax.ops import AGGREGATIONS
from rlhf_jax.pipelines.config import ModelSpec, OptimizerConfig, SupervisedConfig
from rlhf_jax.pipelines.datasets import fixed_batches, load_sft_batch, row_length, row_unit
from rlhf_jax.pipelines.run_dir import prepare_run_dir
from rlhf_jax.pipelines.setup import (base_generation, check_length_fits, load_model,
                                      make_mesh, model_shardings, with_adapter)
from rlhf_jax.pipelines.supervised import run_supervised, supervised_inputs
from rlhf_jax.train.supervised import SupervisedTask


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillAlgorithmConfig:
    """Which divergence, and its settings."""

    loss: str = "forward_kl"
    """A key of ``losses.DISTILL_LOSSES``: forward_kl, reverse_kl, jsd."""
    temperature: float = 1.0
    """Softmax temperature of both distributions."""
    jsd_beta: float = 0.5
    """The generalised JSD's interpolation weight (``jsd`` only)."""
    aggregation: str = "token_mean"
    """How token losses become the batch loss: a key of ``ops.AGGREGATIONS``."""

    def __post_init__(self):
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"algorithm.loss must be one of {sorted(DISTILL_LOSSES)}, got "
                             f"{self.loss!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"algorithm.aggregation must be one of {sorted(AGGREGATIONS)}")
        if not self.temperature > 0:
            raise ValueError(f"algorithm.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(SupervisedConfig):
    """Student <- teacher distillation on JSONL prompt/completion or messages data."""

    teacher: ModelSpec
    """The frozen teacher."""
    student: ModelSpec = ModelSpec()
    """The student to train (a preset initialised fresh, or a checkpoint)."""
    algorithm: DistillAlgorithmConfig = DistillAlgorithmConfig()
    """The divergence."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-5, warmup_steps=10)
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""


def make_distill_loss(student, teacher, algorithm: DistillAlgorithmConfig):
    """``loss_fn(params, TokenBatch, key, teacher_params)`` for ``make_train_step(frozen=...)``."""
    fn = DISTILL_LOSSES[algorithm.loss]
    extra = {"beta": algorithm.jsd_beta} if algorithm.loss == "jsd" else {}

    def loss_fn(params, batch, key, teacher_params):
        s = token_batch_logits(student, params, batch)[:, :-1]
        t = jax.lax.stop_gradient(token_batch_logits(teacher, teacher_params, batch)[:, :-1])
        return fn(s, t, batch.loss_mask[:, 1:], temperature=algorithm.temperature,
                  aggregation=algorithm.aggregation, **extra)

    return loss_fn


def run(cfg: DistillConfig) -> dict:
    """Distil the teacher into the student; returns final metrics and paths."""
    # a fresh (preset) student reads the teacher's tokenizer unless one is given
    own = cfg.student.path is not None or cfg.tokenizer is not None
    field, spec, others = (("student", cfg.student, {"teacher": cfg.teacher}) if own
                           else ("teacher", cfg.teacher, {}))
    tokenizer, train, evals, report = supervised_inputs(cfg, load_sft_batch, field, spec,
                                                        others=others)
    generation = base_generation(cfg.student)
    # Every data and config check before the models are built or anything compiled.
    data = BatchIterator(train, batch_size=cfg.data.batch_size, seed=cfg.seed,
                         unit=row_unit(cfg.data, report))
    batches = fixed_batches(evals, cfg.data.batch_size) if evals is not None else None
    mesh = make_mesh(cfg.mesh, cfg.data.batch_size)
    v = tokenizer.vocab_size
    teacher, teacher_params = load_model(cfg.teacher, heads=("lm",), vocab_size=v, seed=cfg.seed,
                                         frozen="teacher")
    student, params = load_model(cfg.student, heads=("lm",), vocab_size=v, seed=cfg.seed + 1)
    check_length_fits({"teacher": teacher.config, "student": student.config},
                      row_length(train, evals))
    student, params, adapted = with_adapter(cfg.student, student, params, seed=cfg.seed)
    # after every check above: a start refused for its config or data writes nothing
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher vocab {teacher.config.vocab_size} != student vocab "
                         f"{student.config.vocab_size}: distillation needs a shared tokenizer")
    task = SupervisedTask(
        loss_fn=make_distill_loss(student, teacher, cfg.algorithm), data=data,
        eval_batches=batches, frozen=teacher_params,
        frozen_shardings=model_shardings(mesh, teacher.config, teacher_params),
        tokens_in=lambda b: int(b.attention_mask.sum()))
    return run_supervised(cfg, task, run_dir=run_dir, model=student, params=params,
                          tokenizer=tokenizer, mesh=mesh, generation=generation, data_report=report,
                          adapted=adapted)


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.distill is `rlhf-jax distill`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["distill", *sys.argv[1:]]))
