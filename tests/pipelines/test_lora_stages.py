"""LoRA in the stages (issue 16): adapter-only training leaves the base bitwise unchanged, the
checkpoint holds the adapter (and new heads) alone and resumes exactly, the reference is the base
with the adapter off, and the export is the merged model plus a PEFT adapter directory."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from rlhf_jax.models import LoraConfig, load_hf_checkpoint, load_peft_adapter
from rlhf_jax.pipelines import DataConfig, ModelSpec, OptimizerConfig, dpo, reward_model, sft
from rlhf_jax.pipelines.setup import load_model
from rlhf_jax.train import Checkpointer
from tests.pipelines.common import train_rows
from tests.pipelines.conftest import LOG, TINY, loop, sft_config

LORA = LoraConfig(rank=4, alpha=8.0)


def flat(tree) -> dict[str, np.ndarray]:
    """``{"layers/0/attn/q_proj/lora_a": array}``."""
    def name(path):
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return {name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _lora(spec: ModelSpec, **kw) -> ModelSpec:
    return dataclasses.replace(spec, lora=dataclasses.replace(LORA, **kw))


def _pairs(world) -> DataConfig:
    """The preference data every pair-trained stage here reads."""
    return DataConfig(train=world.pref["preference"], max_prompt_length=24, max_length=48,
                      batch_size=8, on_overflow="truncate")


def _checkpoint_leaves(run_dir: str) -> set[str]:
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True)
    step = ck.latest_step()
    meta = ck._manager.item_metadata(step)["state"]  # what is on disk, read without a target
    ck.close()
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(meta)}


@pytest.fixture(scope="module")
def lora_sft(world):
    cfg = sft_config(world.root, world.tokenizer, world.pref["sft"], "sft_lora", steps=3,
                     model=_lora(TINY))
    return cfg, sft.run(cfg)


def test_lora_sft_trains_the_adapter_only_and_exports_merged_and_peft(world, lora_sft):
    cfg, res = lora_sft
    state = res["state"]
    _, base = load_model(TINY, heads=("lm",), vocab_size=512, seed=cfg.seed)
    # the trainable tree is the adapter alone; the optimizer state follows it
    paths = flat(state.params)
    assert paths and all(k.split("/")[-1] in ("lora_a", "lora_b") for k in paths), list(paths)
    leaves = _checkpoint_leaves(res["run_dir"])
    assert leaves and not any("embed" in leaf or "'kernel'" in leaf for leaf in leaves)
    # B started at 0 and moved; the merged export is W + s A B, the base itself never moved
    assert any(np.abs(v).max() > 0 for k, v in paths.items() if k.endswith("lora_b"))
    config, merged = load_hf_checkpoint(res["model_dir"], heads=("lm",))
    lm, adapter = load_peft_adapter(res["adapter_dir"], config)
    for k, v in flat(adapter).items():
        np.testing.assert_array_equal(v, np.asarray(paths[k]), err_msg=k)
    m, b = flat(merged), flat(base)
    q = "layers/0/attn/q_proj"
    a_b = np.asarray(paths[f"{q}/lora_a"]) @ np.asarray(paths[f"{q}/lora_b"])
    np.testing.assert_allclose(m[f"{q}/kernel"], b[f"{q}/kernel"] + LORA.scale * a_b,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(m["embed/embedding"], b["embed/embedding"])  # not adapted


def test_lora_sft_resumes_exactly(world, lora_sft):
    cfg, whole = lora_sft
    part = dataclasses.replace(cfg, output_dir=os.path.join(world.root, "sft_lora_resumed"),
                               loop=loop(2))
    sft.run(part)
    resumed = sft.run(dataclasses.replace(part, loop=cfg.loop))
    for k, v in flat(whole["state"].params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat(resumed["state"].params)[k]),
                                      err_msg=k)


def test_lora_reward_model_trains_adapter_and_head(world, tmp_path):
    res = reward_model.run(reward_model.RewardModelConfig(
        data=_pairs(world),
        tokenizer=world.tokenizer, output_dir=str(tmp_path / "rm"),
        model=_lora(ModelSpec(path=world.sft["model_dir"])),
        optimizer=OptimizerConfig(learning_rate=1e-2), loop=loop(2), logging=LOG, mesh=None))
    keys = set(flat(res["state"].params))
    assert "reward_head/kernel" in keys and any(k.endswith("lora_a") for k in keys)
    config, _ = load_hf_checkpoint(res["model_dir"])
    assert config.heads == ("reward",)


def test_lora_dpo_reference_is_the_base_and_margin_starts_at_zero(world, tmp_path):
    res = dpo.run(dpo.DPOConfig(
        data=_pairs(world),
        tokenizer=world.tokenizer, output_dir=str(tmp_path / "dpo"),
        policy=_lora(ModelSpec(path=world.sft["model_dir"])),
        optimizer=OptimizerConfig(learning_rate=1e-2), loop=loop(2), logging=LOG, mesh=None))
    # a fresh adapter (B = 0) is the reference exactly: the first step's implicit reward
    # margin is 0 and its loss log 2; then the adapter moves the policy away from it
    rows = train_rows(res["run_dir"])
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["rewards/margin"] != 0.0
    assert any(k.endswith("lora_b") for k in flat(res["state"].params))


def test_lora_on_a_frozen_model_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="reference.lora .* frozen"):
        dpo.run(dpo.DPOConfig(
            data=_pairs(world),
            tokenizer=world.tokenizer, output_dir=str(tmp_path / "dpo"),
            policy=ModelSpec(path=world.sft["model_dir"]),
            reference=_lora(ModelSpec(path=world.sft["model_dir"])),
            optimizer=OptimizerConfig(learning_rate=1e-2), loop=loop(2), logging=LOG, mesh=None))


# ----------------------------------------------------------------------- on-policy stages
def test_lora_grpo_samples_merge_free_and_the_reference_is_the_base(world, tmp_path):
    from rlhf_jax.pipelines import KLConfig, grpo
    from rlhf_jax.rewards.verifiers import exact_match_reward
    from tests.pipelines.test_grpo import grpo_config, length_reward

    cfg = grpo_config(world, "grpo_lora", kl=KLConfig(coef=0.05),
                      policy=_lora(ModelSpec(path=world.sft["model_dir"])),
                      output_dir=str(tmp_path / "grpo"))
    res = grpo.run(cfg, reward_fns={"exact_match": exact_match_reward, "length": length_reward})
    rows = train_rows(res["run_dir"])
    # the sampler applies the adapter in its own program: its log-probs equal the trainer's
    assert all(r["logprob_diff_sampler_trainer"] < 1e-4 for r in rows)
    # a fresh adapter is the base (the reference): the first rollout's KL is 0
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl"] != 0.0  # the adapter moved the policy; the base did not move
    assert set(res["state"].params) == {"policy"}
    assert all(k.split("/")[-1] in ("lora_a", "lora_b") for k in flat(res["state"].params))
    assert os.path.isfile(os.path.join(res["adapter_dir"], "adapter_model.safetensors"))


@pytest.mark.slow  # PPO with LoRA runs by default in the critic-adapter test
def test_lora_ppo_trains_adapter_and_shared_value_head(world, tmp_path):
    from rlhf_jax.pipelines import ppo
    from tests.pipelines.test_ppo import LOSS_KL, algo, ppo_config

    res = ppo.run(ppo_config(world, "ppo_lora", steps=2, algorithm=algo(value_model="shared"),
                             kl=LOSS_KL, policy=_lora(ModelSpec(path=world.sft["model_dir"])),
                             output_dir=str(tmp_path / "ppo")))
    keys = set(flat(res["state"].params["policy"]))
    assert {"value_head/kernel", "value_head/bias"} <= keys
    assert any(k.endswith("lora_b") for k in keys)
    assert not any(k.endswith("/kernel") and not k.startswith("value_head") for k in keys)
    rows = train_rows(res["run_dir"])
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_lora_best_of_n_samples_the_adapter(world, lora_sft, tmp_path):
    from rlhf_jax.pipelines import GenerationConfig, RewardConfig, best_of_n

    _, trained = lora_sft
    cfg = best_of_n.BestOfNConfig(
        data=DataConfig(train=world.pref["prompts"], max_prompt_length=24, batch_size=4),
        tokenizer=world.tokenizer, output_dir=str(tmp_path / "bon"), group_size=2,
        policy=ModelSpec(preset=TINY.preset, overrides=TINY.overrides, lora=LORA,
                         adapter=trained["adapter_dir"]),
        rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"])),
        sampling=GenerationConfig(max_new_tokens=4), progress=False)
    with pytest.raises(ValueError, match="policy.lora without policy.adapter"):
        best_of_n.run(dataclasses.replace(cfg, policy=_lora(TINY)))
    res = best_of_n.run(cfg)
    assert res["prompts"] > 0 and os.path.getsize(res["output"]) > 0


def test_lora_distill_student_adapter_reads_the_teacher(world, tmp_path):
    # the task's own frozen arrays (the teacher) ride next to the student's frozen base
    from rlhf_jax.pipelines import distill

    res = distill.run(distill.DistillConfig(
        data=DataConfig(train=world.pref["sft"], max_length=48, batch_size=8,
                        on_overflow="truncate"),
        tokenizer=world.tokenizer, teacher=ModelSpec(path=world.sft["model_dir"]),
        student=_lora(ModelSpec(path=world.sft["model_dir"])),
        output_dir=str(tmp_path / "distill"), optimizer=OptimizerConfig(learning_rate=1e-2),
        loop=loop(2), logging=LOG, mesh=None))
    rows = train_rows(res["run_dir"])
    # student = teacher at the start (same checkpoint, B = 0): the forward KL is 0, then moves
    assert rows[0]["loss"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["loss"] > 0.0
    assert all(k.split("/")[-1] in ("lora_a", "lora_b") for k in flat(res["state"].params))


def test_lora_ppo_critic_is_a_second_adapter_on_the_policy_base(world, tmp_path):
    from rlhf_jax.pipelines import ppo
    from tests.pipelines.test_ppo import ADAPTIVE_KL, ppo_config

    sft_model = ModelSpec(path=world.sft["model_dir"])
    res = ppo.run(ppo_config(world, "ppo_lora_critic", steps=2, kl=ADAPTIVE_KL,
                             policy=_lora(sft_model), value_init=_lora(sft_model),
                             output_dir=str(tmp_path / "ppo")))
    value = set(flat(res["state"].params["value"]))
    assert {"value_head/kernel", "value_head/bias"} <= value
    assert all(k.startswith("value_head") or k.split("/")[-1] in ("lora_a", "lora_b")
               for k in value)
    models = res["models"]
    assert models.critic_lora and models.critic_on_policy_base  # no second base copy
    rows = train_rows(res["run_dir"])
    assert all(np.isfinite(r["value_loss"]) for r in rows)
