"""RL on conversational prompts: the sampler conditions on the chat template's generation prompt
(the first sampled token follows ``<|im_start|>assistant\\n``), reward functions receive TRL's
conversational prompts and completions, and GRPO trains on them with non-zero gradients."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from rlhf_jax.data import Tokenizer
from rlhf_jax.models import load_hf_checkpoint, model_for
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, LoggingConfig, LoopConfig,
                                ModelSpec, OptimizerConfig, RewardConfig, grpo)
from rlhf_jax.pipelines.datasets import load_prompts
from rlhf_jax.sampling import SamplingConfig, make_sampler

DATA = dict(max_prompt_length=32, batch_size=4)


def test_sampled_tokens_follow_the_assistant_header(chat_world):
    tok = Tokenizer.load(chat_world["ckpt"])
    prompts, rows = load_prompts(chat_world["prompt_chat"],
                                 DataConfig(train=chat_world["prompt_chat"], **DATA), tok)
    header = tok.encode_structure("<|im_start|>assistant\n")
    assert header[0] == tok.token_to_id("<|im_start|>")
    tokens = np.asarray(prompts.tokens)
    assert (tokens[:, -len(header):] == np.asarray(header)).all()
    assert all(isinstance(r["prompt"], list) and r["answer"] for r in rows)
    config, params = load_hf_checkpoint(chat_world["ckpt"], heads=("lm",))
    sample = make_sampler(model_for(config), SamplingConfig(
        max_new_tokens=4, eos_ids=tok.eos_ids, pad_id=tok.pad_id, temperature=1.0))
    out = sample(params, prompts.tokens[:4], prompts.mask[:4], jax.random.PRNGKey(0))
    # the sampler's context is the prompt as given: it ends with the assistant header, and the
    # completion starts right after it
    assert (np.asarray(out.prompt_tokens)[:, -len(header):] == np.asarray(header)).all()
    assert np.asarray(out.mask)[:, 0].all()


def test_grpo_trains_on_conversational_prompts(chat_world, tmp_path):
    seen = {}

    def by_length(prompts, completions, answer, **columns):
        seen.update(prompts=prompts[0], completion=completions[0], answer=answer[0])
        return [float(len(c[0]["content"])) for c in completions]

    cfg = grpo.GRPOConfig(
        data=DataConfig(train=chat_world["prompt_chat"], **DATA),
        policy=ModelSpec(path=chat_world["ckpt"]), output_dir=str(tmp_path / "run"),
        sampling=GenerationConfig(max_new_tokens=6),
        algorithm=grpo.GRPOAlgorithmConfig(group_size=2),
        rewards=RewardConfig(), optimizer=OptimizerConfig(learning_rate=1e-3,
                                                          schedule="constant"),
        loop=LoopConfig(total_steps=2, log_every=1, save_every=2),
        logging=LoggingConfig(progress=False, console=False, tensorboard=False), mesh=None)
    result = grpo.run(cfg, reward_fns={"length": by_length})
    assert result["complete"]
    assert seen["prompts"] == [{"role": "user", "content": seen["prompts"][0]["content"]}]
    assert seen["completion"][0]["role"] == "assistant" and seen["answer"].startswith("The ")
    rows = [json.loads(x) for x in open(os.path.join(result["run_dir"], "metrics.jsonl"))]
    train = [r for r in rows if r.get("split") == "train"]
    assert train and all(r["grad_norm"] > 0 for r in train)
    assert np.isfinite([r["loss"] for r in train]).all()
