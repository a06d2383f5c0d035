"""GRPO and its variants on the arithmetic task (exact-match verifier plus a length reward),
and GRPO against the reward model."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, MeshConfig, ModelSpec,
                                OptimizerConfig, OverlapConfig, RewardConfig, grpo)
from rlhf_jax.pipelines.setup import split_mesh
from rlhf_jax.rewards.verifiers import exact_match_reward
from tests.pipelines.common import (assert_moved, assert_run_outputs, assert_unchanged, flat,
                                    train_rows)
from tests.pipelines.conftest import LOG, loop

OPT = OptimizerConfig(learning_rate=1e-3, schedule="constant")


def length_reward(prompts, completions, **columns):
    """A dense reward (characters / 10) so that groups differ even when no answer is right."""
    assert len(columns["answer"]) == len(completions)
    return [len(c) / 10.0 for c in completions]


def algo(**kw) -> grpo.GRPOAlgorithmConfig:
    return grpo.GRPOAlgorithmConfig(**({"group_size": 2, "num_minibatches": 2} | kw))


def grpo_config(world, name: str, *, prompts: str | None = None, max_prompt_length: int = 16,
                **kw) -> grpo.GRPOConfig:
    data = DataConfig(train=prompts or world.arith["train_prompts"],
                      max_prompt_length=max_prompt_length, batch_size=4)
    base = dict(data=data, tokenizer=world.tokenizer,
                policy=ModelSpec(path=world.sft["model_dir"]),
                output_dir=os.path.join(world.root, name),
                sampling=GenerationConfig(max_new_tokens=4), algorithm=algo(),
                optimizer=OPT, loop=loop(2), logging=LOG, mesh=None)
    return grpo.GRPOConfig(**(base | kw))


@pytest.mark.parametrize("variant", sorted(grpo.VARIANTS))
def test_grpo_variant(world, variant):
    cfg = grpo_config(world, f"grpo_{variant}", algorithm=algo(variant=variant),
                      kl=KLConfig(coef=0.05))
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
                      rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"]),
                                           model_weight=2.0))
    result = grpo.run(cfg)
    rows = assert_run_outputs(result, steps=2, kind="GRPOConfig")
    for r in rows:
        assert r["reward"] == pytest.approx(2.0 * r["rewards/reward_model"], rel=1e-5, abs=1e-7)
        assert r["reward_group_std"] > 0.0 and r["kept_frac"] == 1.0
        assert r["logprob_diff_sampler_trainer"] < 1e-4
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert_moved(result["model_dir"], init, heads=("lm",))


def test_grpo_config_checks(world):
    with pytest.raises(ValueError, match="algorithm.group_size must be >= 2"):
        grpo_config(world, "x", algorithm=algo(group_size=1))
    with pytest.raises(ValueError, match="algorithm.variant must be one of"):
        grpo_config(world, "x", algorithm=algo(variant="ppo"))
    with pytest.raises(ValueError, match="must be divisible by algorithm.num_minibatches"):
        grpo_config(world, "x", algorithm=algo(num_minibatches=3))
    with pytest.raises(ValueError, match=r"GRPO needs reward_fns \(or rewards.functions\) or a "
                                         r"rewards.model"):
        grpo.run(grpo_config(world, "grpo_none"))
    assert not os.path.exists(os.path.join(world.root, "grpo_none"))  # nothing written


def test_one_update_per_rollout_reuses_the_updates_logprobs(world):
    """``epochs == num_minibatches == 1``: "old" log-probs taken from the update's own
    forward pass (one scoring pass fewer) give the run that scores the policy again, to float32
    rounding, with the ratio exactly 1 (no clipping) and the sampler gap still measured."""
    fns = {"exact_match": exact_match_reward, "length": length_reward}
    runs = {}
    for reuse in (True, False):
        cfg = grpo_config(world, f"grpo_reuse_{reuse}", kl=KLConfig(coef=0.05),
                          algorithm=algo(num_minibatches=1, reuse_logprobs=reuse))
        result = grpo.run(cfg, reward_fns=fns)
        assert set(result["state"].params) == {"policy"}  # no critic
        runs[reuse] = (flat(jax.device_get(result["state"].params["policy"])),
                       train_rows(result["run_dir"]))
    (p_reuse, rows_reuse), (p_score, rows_score) = runs[True], runs[False]
    for k in p_score:
        np.testing.assert_allclose(p_reuse[k], p_score[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(rows_reuse, rows_score):
        for key in ("loss", "reward", "policy/kl", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert a["policy/clip_frac"] == 0.0
        assert a["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= a["logprob_diff_sampler_trainer"] < 1e-4
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert any(not np.allclose(p_reuse[k], v) for k, v in flat(init).items() if k in p_reuse)


def test_grpo_one_step_off_on_a_rollout_sub_mesh(world):
    """``overlap``: the rollout on the last 4 of the 8 devices (reference and reward model
    there too), one step ahead of the update on the first 4; the off-policy metrics are logged
    (the glossary check is ``assert_run_outputs``'s) and the policy trains."""
    cfg = grpo_config(world, "grpo_overlap", prompts=world.pref["prompts"],
                      max_prompt_length=24, kl=KLConfig(coef=0.05), mesh=MeshConfig(),
                      rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"])),
                      overlap=OverlapConfig(max_staleness=1, rollout_devices=4), loop=loop(3))
    result = grpo.run(cfg)
    rows = assert_run_outputs(result, steps=3, kind="GRPOConfig")
    for r in rows:
        assert 0.0 <= r["offpolicy/is_clipped_frac"] <= 1.0
        assert r["offpolicy/logprob_diff"] >= 0.0 and r["offpolicy/is_weight_mean"] > 0.0
    assert rows[0]["offpolicy/logprob_diff"] < 1e-4  # step 0 samples with its own params
    assert all(r["offpolicy/logprob_diff"] > 1e-6 for r in rows[1:])  # later ones a step late
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert_moved(result["model_dir"], init, heads=("lm",))


def test_overlap_config_checks(world):
    with pytest.raises(ValueError, match="overlap.max_staleness must be 0"):
        OverlapConfig(max_staleness=2)
    with pytest.raises(ValueError, match="overlap.is_cap must be >= 1"):
        OverlapConfig(is_cap=0.5)
    with pytest.raises(ValueError, match="overlap.rollout_devices needs a mesh"):
        grpo_config(world, "x", overlap=OverlapConfig(rollout_devices=4))
    with pytest.raises(ValueError, match="fewer devices than the 8"):
        split_mesh(MeshConfig(), 8, 8)
    with pytest.raises(ValueError, match="the training mesh on 5 devices"):
        split_mesh(MeshConfig(fsdp=2), 8, 3)
    with pytest.raises(ValueError, match="not divisible by data x fsdp = 6 of the rollout mesh"):
        split_mesh(MeshConfig(), 4, 6)  # 4 rows split over the 2 training devices, not 6


def test_remat_policy_and_bfloat16_reference(world):
    """``policy.remat`` and a ``bfloat16`` reference (the memory savers of
    ``benchmarks.grpo_vs_trl --real-shape``): the loaded models say so; remat alone trains as
    the plain run does (the same completions and losses, gradients to float32 rounding); with
    the bfloat16 reference the first step samples what the plain run samples, and its KL to the
    bfloat16 copy of the policy stays at bfloat16 rounding (the plain run's is float32's)."""
    fns = {"exact_match": exact_match_reward, "length": length_reward}
    rows = {}
    for name, remat, ref_dtype in (("plain", False, None), ("remat", True, None),
                                   ("both", True, "bfloat16")):
        spec = ModelSpec(path=world.sft["model_dir"], remat=remat)
        ref = None if ref_dtype is None else ModelSpec(path=world.sft["model_dir"],
                                                       dtype=ref_dtype)
        result = grpo.run(grpo_config(world, f"grpo_saver_{name}", policy=spec, reference=ref,
                                      kl=KLConfig(coef=0.05), algorithm=algo(num_minibatches=1)),
                          reward_fns=fns)
        rows[name] = train_rows(result["run_dir"])
        models = result["models"]
        assert models.policy.config.remat is remat
        assert models.reference.config.param_dtype == (ref_dtype or "float32")
    plain, remat, both = rows["plain"], rows["remat"], rows["both"]
    for a, b in zip(plain, remat):  # every step: remat changes no number beyond rounding
        assert a["response_length"] == b["response_length"]
        np.testing.assert_allclose([b["loss"], b["reward"]], [a["loss"], a["reward"]],
                                   rtol=1e-4, atol=1e-6)
    for key in ("reward", "response_length"):
        assert both[0][key] == plain[0][key], key  # the same completions
    assert abs(plain[0]["kl"]) < 1e-4 and 0.0 < abs(both[0]["kl"]) < 0.05
    assert all(np.isfinite(r["loss"]) for r in both)
