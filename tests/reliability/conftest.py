"""Fixtures of the reliability tests: the pipelines' tiny world (tokenizer, datasets, one SFT
and one reward-model run, built once per session) and the shared run configurations."""

from __future__ import annotations

import os

from rlhf_jax.pipelines import DataConfig, LoggingConfig, LoopConfig, OptimizerConfig, sft
from tests.pipelines.conftest import TINY, world  # noqa: F401  (the fixture, re-exported)

CRASH_OPT = OptimizerConfig(learning_rate=1e-2, schedule="constant")
QUIET = LoggingConfig(progress=False, tensorboard=False)
"""No progress bar, no TensorBoard: the reliability runs only need ``metrics.jsonl``."""


def crash_sft_config(*, train_data: str, tokenizer: str, output_dir: str, steps: int,
                     save_every: int, keep: int = 3, max_skips: int = 10) -> sft.SFTConfig:
    """The small SFT run of the crash tests (started as a subprocess, and once in-process as
    the reference) and of the numerical-guard tests."""
    return sft.SFTConfig(data=DataConfig(train=train_data, max_length=48, packing=True,
                                         batch_size=8, on_overflow="truncate"),
                         tokenizer=tokenizer, output_dir=output_dir, model=TINY,
                         optimizer=CRASH_OPT, mesh=None, logging=QUIET,
                         loop=LoopConfig(total_steps=steps, log_every=1, save_every=save_every,
                                         keep_checkpoints=keep, max_consecutive_skips=max_skips,
                                         eval_at_start=False))


def ledger(run_dir: str) -> list[str]:
    with open(os.path.join(run_dir, "ledger.tsv"), encoding="utf-8") as f:
        return f.read().splitlines()
