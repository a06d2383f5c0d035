"""Every training pipeline on every mesh shape of the 8 virtual devices gives the numbers of the
single-device run: per-step losses and sample statistics, and the final parameters, to float32
rounding (the sharded programs sum in another order). SFT and GRPO also train a LoRA adapter on
the sharded frozen base (``*_lora``); SFT also trains a Qwen3-MoE model (``sft_moe``).

The model has 8 query / 4 key-value heads and widths divisible by 8, so ``tensor`` really splits
heads and the MLP (on ``tensor=8`` the 4 key/value heads fall back to replicated); ``fsdp``
shards every large matrix. PPO and GRPO also sample on the mesh: equal response lengths and
rewards mean the same tokens were generated.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest

from rlhf_jax.models import LoraConfig
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, ModelSpec,
                                OptimizerConfig, RewardConfig, distill, dpo, grpo, ppo,
                                reward_model, sft)
from rlhf_jax.rewards.verifiers import exact_match_reward
from tests.pipelines.common import flat, train_rows
from tests.pipelines.conftest import LOG, loop

SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
MODEL = ModelSpec(preset="toy-1m", overrides={"hidden_size": 32, "intermediate_size": 64,
                                              "num_layers": 1, "num_heads": 8,
                                              "num_kv_heads": 4})
# eps 1e-6, not Adam's 1e-8: the first Adam step maps a gradient g to lr * g / (|g| + eps), so
# an element whose true gradient is ~1e-8 (DPO's step 1 sits at margin 0) turns the last-bit
# differences of another reduction order (tensor-parallel sums) into ~2% of lr; with eps 1e-6
# such elements move ~lr * g / eps, and the comparison below measures the meshes, not that map.
OPT = OptimizerConfig(learning_rate=1e-3, schedule="constant", eps=1e-6)
STEPS = 2


def _configs(world) -> dict:
    # output_dir is replaced by _run
    common = dict(tokenizer=world.tokenizer, output_dir="unset", optimizer=OPT,
                  loop=loop(STEPS), logging=LOG, mesh=None)
    p = world.pref
    sft_data = DataConfig(train=p["sft"], max_length=48, batch_size=8, on_overflow="truncate")
    pairs = DataConfig(train=p["preference"], max_prompt_length=24, max_length=48, batch_size=8,
                       on_overflow="truncate")
    return {
        "sft": (sft.run, sft.SFTConfig(data=sft_data, model=MODEL, **common)),
        "reward_model": (reward_model.run, reward_model.RewardModelConfig(
            data=pairs, model=MODEL, **common)),
        "dpo": (dpo.run, dpo.DPOConfig(data=pairs, policy=MODEL, **common)),
        "distill": (distill.run, distill.DistillConfig(
            data=sft_data, teacher=MODEL, student=MODEL, **common)),
        "ppo": (ppo.run, ppo.PPOConfig(
            data=DataConfig(train=p["prompts"], max_prompt_length=24, batch_size=8),
            policy=MODEL, rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"])),
            sampling=GenerationConfig(max_new_tokens=6),
            algorithm=ppo.PPOAlgorithmConfig(epochs=1, num_minibatches=2),
            kl=KLConfig(coef=0.05, mode="reward"), **common)),
        "grpo": (lambda cfg: grpo.run(cfg, reward_fns={"exact_match": exact_match_reward,
                                                       "length": _length}),
                 grpo.GRPOConfig(
                     data=DataConfig(train=world.arith["train_prompts"], max_prompt_length=16,
                                     batch_size=4),
                     policy=MODEL, sampling=GenerationConfig(max_new_tokens=4),
                     algorithm=grpo.GRPOAlgorithmConfig(group_size=2, num_minibatches=2),
                     kl=KLConfig(coef=0.05), **common)),
    }


def _variant_configs(world) -> dict:
    """SFT and GRPO training a LoRA adapter (rank 8) on the frozen, sharded base, and SFT of a
    Qwen3-MoE model (4 experts over ``fsdp``, their hidden size over ``tensor``)."""
    lora = dataclasses.replace(MODEL, lora=LoraConfig(rank=8, alpha=16.0))
    moe = dataclasses.replace(MODEL, overrides=dict(MODEL.overrides) | dict(
        family="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, router_aux_loss_coef=0.01))
    base = _configs(world)
    out = {f"{k}_lora": (fn, dataclasses.replace(
        cfg, **{"model" if k == "sft" else "policy": lora})) for k, (fn, cfg) in base.items()
        if k in ("sft", "grpo")}
    return out | {"sft_moe": (base["sft"][0], dataclasses.replace(base["sft"][1], model=moe))}


def _length(prompts, completions, **columns):
    return [len(c) / 10.0 for c in completions]


_BASELINES: dict = {}


def _run(world, name: str, shape):
    fn, cfg = (_configs(world) | _variant_configs(world))[name]
    tag = "one" if shape is None else "x".join(map(str, shape))
    mesh = None if shape is None else MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2])
    out = fn(dataclasses.replace(cfg, mesh=mesh,
                                 output_dir=os.path.join(world.root, f"mesh_{name}_{tag}")))
    return flat(jax.device_get(out["state"].params)), train_rows(out["run_dir"])


def _baseline(world, name: str):
    if name not in _BASELINES:
        _BASELINES[name] = _run(world, name, None)
    return _BASELINES[name]


# Figures that must agree; sample statistics (lengths, rewards) agree only if the same tokens
# were sampled.
KEYS = ("loss", "grad_norm", "count", "nll", "moe_aux_loss", "rewards/accuracy", "kl", "policy/kl",
        "response_length", "reward", "rewards/length", "value_loss", "policy_loss")


DEFAULT = ("sft", "dpo", "grpo", "sft_lora", "sft_moe")
"""Run by default (CI) on 2x2x2, which uses every axis; every other pair with -m slow."""
CASES = [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}",
                      marks=() if shape == (2, 2, 2) and name in DEFAULT else pytest.mark.slow)
         for shape in SHAPES
         for name in ("sft", "reward_model", "dpo", "distill", "ppo", "grpo", "sft_lora",
                      "grpo_lora", "sft_moe")]


@pytest.mark.parametrize("name, shape", CASES)
def test_pipeline_on_mesh_equals_one_device(world, name, shape):
    assert jax.device_count() == 8  # tests/conftest.py
    params1, rows1 = _baseline(world, name)
    params8, rows8 = _run(world, name, shape)
    assert [r["step"] for r in rows8] == [r["step"] for r in rows1] == list(range(1, STEPS + 1))
    compared = 0
    for a, b in zip(rows8, rows1):
        for k in KEYS:
            if k in b:
                np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6,
                                           err_msg=f"{name} {shape} step {b['step']} {k}")
                compared += 1
    assert compared >= 2 * STEPS
    assert params8.keys() == params1.keys()
    for k in params1:
        np.testing.assert_allclose(params8[k], params1[k], rtol=0, atol=2e-5,
                                   err_msg=f"{name} {shape} {k}")
