"""A tiny world shared by the pipeline tests: a BPE tokenizer, preference-world and arithmetic
JSONL files, one SFT run (policy / reference / teacher) and one reward-model run.

Compilation dominates the runtime, so the model is ~30k parameters and every run is a few steps.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from experiments.tasks import arithmetic, preference_world
from rlhf_jax.data import train_bpe_tokenizer
from rlhf_jax.pipelines import (DataConfig, LoggingConfig, LoopConfig, ModelSpec,
                                OptimizerConfig, reward_model, sft)

TINY = ModelSpec(preset="toy-1m", overrides={"hidden_size": 32, "intermediate_size": 64,
                                             "num_layers": 1, "num_heads": 2,
                                             "num_kv_heads": 1})
SFT_OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
LOG = LoggingConfig(progress=False, tensorboard=True)
"""Every pipeline test's sinks: no progress bar, TensorBoard on (its files are checked)."""


def loop(steps: int, **kw) -> LoopConfig:
    return LoopConfig(total_steps=steps, log_every=1, **kw)


@dataclasses.dataclass(frozen=True)
class World:
    root: str
    tokenizer: str
    pref: dict
    arith: dict
    sft_cfg: sft.SFTConfig
    sft: dict
    rm: dict


def sft_config(world_root: str, tokenizer: str, train_data: str, name: str, *, steps: int = 4,
               **kw) -> sft.SFTConfig:
    """The SFT config the world and the resume / accumulation / mesh tests share."""
    data = DataConfig(train=train_data, max_length=48, packing=True, batch_size=8,
                      on_overflow="truncate")
    return sft.SFTConfig(data=data, tokenizer=tokenizer,
                         output_dir=os.path.join(world_root, name), model=kw.pop("model", TINY),
                         optimizer=SFT_OPT, loop=loop(steps), logging=LOG,
                         mesh=kw.pop("mesh", None), **kw)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = str(tmp_path_factory.mktemp("pipelines"))
    texts = preference_world.corpus(0, n_responses=300) + arithmetic.corpus(0, n=300)
    tok = os.path.join(root, "tokenizer")
    train_bpe_tokenizer(texts, vocab_size=512).save(tok)
    pref = preference_world.write_datasets(os.path.join(root, "pref"), n_sft=64, n_pref=64,
                                           n_prompts=32, n_eval_prompts=16,
                                           n_pref_eval=32)["paths"]
    arith = arithmetic.write_datasets(os.path.join(root, "arith"), n_sft=32, n_train=16,
                                      n_eval=8)["paths"]
    cfg = sft_config(root, tok, pref["sft"], "sft")
    sft_res = sft.run(cfg)
    rm_res = reward_model.run(reward_model.RewardModelConfig(
        data=DataConfig(train=pref["preference"], max_prompt_length=24, max_length=48,
                        batch_size=8, on_overflow="truncate"),
        tokenizer=tok, output_dir=os.path.join(root, "rm"),
        model=ModelSpec(path=sft_res["model_dir"]),
        optimizer=OptimizerConfig(learning_rate=1e-2), loop=loop(3), logging=LOG, mesh=None))
    return World(root, tok, pref, arith, cfg, sft_res, rm_res)
