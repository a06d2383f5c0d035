"""GRPO and its variants on the arithmetic task (exact-match verifier plus a length reward),
and GRPO against the reward model."""

from __future__ import annotations

import os

import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.pipelines import ModelSpec, grpo
from rlhf_jax.rewards.verifiers import exact_match_reward
from rlhf_jax.train import OptimizerConfig
from tests.pipelines.common import assert_moved, assert_run_outputs, assert_unchanged
from tests.pipelines.conftest import loop

OPT = OptimizerConfig(learning_rate=1e-3, schedule="constant", total_steps=2)


def length_reward(prompts, completions, **columns):
    """A dense reward (characters / 10) so that groups differ even when no answer is right."""
    assert len(columns["answer"]) == len(completions)
    return [len(c) / 10.0 for c in completions]


def grpo_config(world, name: str, **kw) -> grpo.GRPOConfig:
    base = dict(prompts=world.arith["train_prompts"], tokenizer=world.tokenizer,
                policy=ModelSpec(path=world.sft["model_dir"]),
                output_dir=os.path.join(world.root, name), max_prompt_length=16,
                max_new_tokens=4, prompts_per_step=4, group_size=2, num_minibatches=2,
                optimizer=OPT, loop=loop(2), mesh=None)
    return grpo.GRPOConfig(**(base | kw))


@pytest.mark.parametrize("variant", sorted(grpo.VARIANTS))
def test_grpo_variant(world, variant):
    cfg = grpo_config(world, f"grpo_{variant}", variant=variant, kl_coef=0.05)
    result = grpo.run(cfg, reward_fns={"exact_match": exact_match_reward,
                                       "length": length_reward})
    rows = assert_run_outputs(result, steps=2, kind="GRPOConfig")
    for r in rows:
        assert 0.0 <= r["rewards/exact_match"] <= 1.0
        assert 0.0 <= r["rewards/length"] <= 4.0  # at most 4 tokens of at most ~10 chars
        # the trained reward is the (unit-weighted) sum of the reward functions
        assert r["reward"] == pytest.approx(r["rewards/exact_match"] + r["rewards/length"],
                                            abs=1e-5)
        assert r["logprob_diff_sampler_trainer"] < 1e-4
        assert 1.0 <= r["response_length"] <= 4.0
        if not grpo.VARIANTS[variant].dynamic_sampling:
            assert r["kept_frac"] == 1.0
        else:  # overlong filter: truncated completions never count
            assert r["kept_frac"] <= 1.0 - r["truncated_frac"] + 1e-6
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    if any(r["kept_frac"] > 0 for r in rows):
        assert_moved(result["model_dir"], init, heads=("lm",))
    else:  # every completion masked out (DAPO, all truncated): no gradient, no update at all
        assert_unchanged(result["model_dir"], init, heads=("lm",))


def test_grpo_with_reward_model(world):
    cfg = grpo_config(world, "grpo_rm", prompts=world.pref["prompts"], max_prompt_length=24,
                      reward_model=ModelSpec(path=world.rm["model_dir"]),
                      reward_model_weight=2.0)
    result = grpo.run(cfg)
    rows = assert_run_outputs(result, steps=2, kind="GRPOConfig")
    for r in rows:
        assert r["reward"] == pytest.approx(2.0 * r["rewards/reward_model"], rel=1e-5, abs=1e-7)
        assert r["reward_group_std"] > 0.0 and r["kept_frac"] == 1.0
        assert r["logprob_diff_sampler_trainer"] < 1e-4
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert_moved(result["model_dir"], init, heads=("lm",))


def test_grpo_config_checks(world):
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        grpo_config(world, "x", group_size=1)
    with pytest.raises(ValueError, match="variant must be one of"):
        grpo_config(world, "x", variant="ppo")
    with pytest.raises(ValueError, match="divisible by num_minibatches"):
        grpo_config(world, "x", num_minibatches=3)
    with pytest.raises(ValueError, match="needs reward_fns or a reward_model"):
        grpo.run(grpo_config(world, "grpo_none"))
    assert not os.path.exists(os.path.join(world.root, "grpo_none"))  # nothing written
