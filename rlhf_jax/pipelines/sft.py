"""Supervised fine-tuning: masked next-token NLL on ``prompt``/``completion`` or ``messages`` data.

The loss covers completion tokens (and the closing EOS) only, or for chat data the assistant
turns and their end-of-turn tokens. With ``data.packing`` whole examples are packed first-fit
into rows of ``data.max_length`` tokens; attention stays within each example (segment ids) and
positions restart per example, so packing changes speed, not the maths. The step divides the
summed NLL by the number of supervised tokens of the whole batch once (exact under
micro-batching).
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.data import BatchIterator
from rlhf_jax.losses import sft_loss
from rlhf_jax.models import token_batch_logprobs
from rlhf_jax.ops import AGGREGATIONS, Mean
from rlhf_jax.pipelines.config import ModelSpec, OptimizerConfig, SupervisedConfig
from rlhf_jax.pipelines.datasets import fixed_batches, load_sft_batch, row_length, row_unit
from rlhf_jax.pipelines.run_dir import prepare_run_dir
from rlhf_jax.pipelines.setup import (base_generation, check_length_fits, load_model,
                                      make_mesh, with_adapter)
from rlhf_jax.pipelines.supervised import run_supervised, supervised_inputs
from rlhf_jax.train.supervised import SupervisedTask


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning on JSONL ``prompt``/``completion`` or ``messages`` rows (the
    format is detected from the first row)."""

    model: ModelSpec = ModelSpec()
    """The model to fine-tune."""
    aggregation: str = "token_mean"
    """How token losses become the batch loss: a key of ``ops.AGGREGATIONS``."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=2e-5, warmup_steps=10)
    """AdamW and its learning-rate schedule (its length is ``loop.total_steps``)."""

    def __post_init__(self):
        super().__post_init__()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got "
                             f"{self.aggregation!r}")


def run(cfg: SFTConfig) -> dict:
    """Train, evaluate, checkpoint and export; returns the final metrics and paths."""
    tokenizer, train, evals, report = supervised_inputs(cfg, load_sft_batch, "model", cfg.model)
    generation = base_generation(cfg.model)
    # Every data and config check before the model is built or anything compiled.
    data = BatchIterator(train, batch_size=cfg.data.batch_size, seed=cfg.seed,
                         unit=row_unit(cfg.data, report))
    eval_batches = fixed_batches(evals, cfg.data.batch_size) if evals is not None else None
    mesh = make_mesh(cfg.mesh, cfg.data.batch_size)
    model, params = load_model(cfg.model, heads=("lm",), vocab_size=tokenizer.vocab_size,
                               seed=cfg.seed)
    check_length_fits({"model": model.config}, row_length(train, evals))
    model, params, adapted = with_adapter(cfg.model, model, params, seed=cfg.seed)
    # after every check above: a start refused for its config or data writes nothing
    run_dir = prepare_run_dir(cfg, cfg.output_dir)

    moe = model.config.num_experts > 0

    def loss_fn(p, batch, key):
        if not moe:
            lp = token_batch_logprobs(model, p, batch)
            return sft_loss(lp, batch.loss_mask, aggregation=cfg.aggregation)
        # mixture of experts: the router's load-balancing term joins the mean loss
        lp, aux = token_batch_logprobs(model, p, batch, with_aux=True)
        total, count, metrics = sft_loss(lp, batch.loss_mask, aggregation=cfg.aggregation)
        return total + aux * count, count, metrics | {"moe_aux_loss": Mean(aux * count, count)}

    task = SupervisedTask(loss_fn=loss_fn, data=data, eval_batches=eval_batches,
                          postfix=("loss", "nll"),
                          tokens_in=lambda b: int(b.attention_mask.sum()))
    return run_supervised(cfg, task, run_dir=run_dir, model=model, params=params,
                          tokenizer=tokenizer, mesh=mesh, generation=generation, data_report=report,
                          adapted=adapted)


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.sft is `rlhf-jax sft`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["sft", *sys.argv[1:]]))
