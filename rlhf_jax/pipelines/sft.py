"""Supervised fine-tuning: masked next-token NLL on ``prompt``/``completion`` or ``messages`` data.

The loss covers completion tokens (and the closing EOS) only, or for chat data the assistant
turns and their end-of-turn tokens. With ``packing`` whole examples are packed first-fit into
rows of ``max_length`` tokens; attention stays within each example (segment ids) and positions
restart per example, so packing changes speed, not the maths. The step divides the summed NLL
by the number of supervised tokens of the whole batch once (exact under micro-batching).
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.losses import sft_loss
from rlhf_jax.models import token_batch_logprobs
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines.common import ModelSpec, fit, fixed_batches, load_model, load_sft_batch, \
    make_mesh, prepare_run_dir
from rlhf_jax.train import LoopConfig, OptimizerConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning on JSONL ``prompt``/``completion`` or ``messages`` rows."""

    train_data: str
    """JSONL file; the format is detected from the first row."""
    tokenizer: str
    """Directory with ``tokenizer.json`` (and ``tokenizer_config.json``)."""
    output_dir: str = "runs/sft"
    eval_data: str | None = None
    model: ModelSpec = ModelSpec()
    max_length: int = 64
    """Tokens per row (prompt + completion, or a packed row)."""
    packing: bool = True
    batch_size: int = 32
    """Rows per optimizer step."""
    micro_batches: int = 1
    """Gradient accumulation: the batch is processed in this many slices."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=10,
                                                 total_steps=200)
    loop: LoopConfig = LoopConfig(total_steps=200, log_every=10, save_every=100)
    aggregation: str = "token_mean"
    on_overflow: str = "error"
    """Rows longer than ``max_length``: ``error``, ``truncate`` or ``skip``."""
    skip_invalid: bool = False
    """Skip (and count) malformed rows instead of stopping at the first."""
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (``parallel.MeshConfig``; default: every
    device data-parallel); None runs on one device. Not part of the run's identity: a run
    resumes on another mesh."""
    seed: int = 0

    def __post_init__(self):
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by micro_batches "
                             f"{self.micro_batches}")


def run(cfg: SFTConfig) -> dict:
    """Train, evaluate, checkpoint and export; returns the final metrics and paths."""
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    train = load_sft_batch(cfg.train_data, cfg, tokenizer)
    evals = load_sft_batch(cfg.eval_data, cfg, tokenizer) if cfg.eval_data else None
    # Every data and config check before the model is built or anything compiled.
    data = BatchIterator(train, batch_size=cfg.batch_size, seed=cfg.seed)
    eval_batches = fixed_batches(evals, cfg.batch_size) if evals is not None else None
    mesh = make_mesh(cfg.mesh, cfg.batch_size)
    model, params = load_model(cfg.model, heads=("lm",), vocab_size=tokenizer.vocab_size,
                               seed=cfg.seed)

    def loss_fn(p, batch, key):
        lp = token_batch_logprobs(model, p, batch)
        return sft_loss(lp, batch.loss_mask, aggregation=cfg.aggregation)

    return fit(cfg, run_dir=run_dir, tokenizer=tokenizer, model=model, params=params,
               loss_fn=loss_fn, data=data, eval_batches=eval_batches, mesh=mesh,
               postfix=("loss", "nll"), tokens_in=lambda b: int(b.attention_mask.sum()))
