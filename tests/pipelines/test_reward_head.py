"""A causal-LM checkpoint given as the reward model that scores completions is refused before
anything is written: its missing reward head would start at zero and every completion would
score 0 (a critic may start from a zero head; a scoring reward model never may)."""

from __future__ import annotations

import os

import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, ModelSpec, RewardConfig,
                                best_of_n, grpo, ppo)


def _common(world, out):
    return dict(data=DataConfig(train=world["prompt_chat"], max_prompt_length=32, batch_size=4),
                policy=ModelSpec(path=world["ckpt"]), output_dir=out,
                sampling=GenerationConfig(max_new_tokens=4),
                rewards=RewardConfig(model=ModelSpec(path=world["ckpt"])))


@pytest.mark.parametrize("stage", ["ppo", "grpo", "best_of_n"])
def test_a_causal_lm_as_the_reward_model_is_refused(chat_world, tmp_path, stage):
    out = str(tmp_path / "run")
    kw = _common(chat_world, out)
    if stage == "ppo":
        cfg, run = ppo.PPOConfig(**kw, mesh=None), ppo.run
    elif stage == "grpo":
        cfg, run = grpo.GRPOConfig(**kw, algorithm=grpo.GRPOAlgorithmConfig(group_size=2),
                                   mesh=None), grpo.run
    else:
        cfg, run = best_of_n.BestOfNConfig(**kw, group_size=2), best_of_n.run
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert "stores no reward head (score.weight): it would start at zero" in str(err.value)
    assert "LlamaForCausalLM" in str(err.value)
    assert not os.path.exists(out)  # nothing written


def test_the_critic_and_the_reward_model_stage_may_start_from_a_zero_head(chat_world):
    config, params = load_hf_checkpoint(chat_world["ckpt"], heads=("value",))
    assert "value" in config.heads
    config, params = load_hf_checkpoint(chat_world["ckpt"], heads=("reward",))
    assert float(abs(params["reward_head"]["kernel"]).sum()) == 0.0
