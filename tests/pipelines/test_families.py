"""Every model family through the pipelines (issue 17): a two-step SFT run whose export reads back
as the same family with the same switches, then a two-step GRPO run (sampler, scoring, the
reference and the update) from that export. The architectures are tiny presets with each
family's switches (``models._hf_config.TRAITS`` and its special features: Gemma's soft-caps,
per-layer windows and local RoPE base, Phi-3's window)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.models._hf_config import TRAITS
from rlhf_jax.pipelines import GenerationConfig, KLConfig, ModelSpec, grpo, sft
from rlhf_jax.rewards.verifiers import exact_match_reward
from tests.pipelines.common import train_rows
from tests.pipelines.conftest import TINY, sft_config
from tests.pipelines.test_grpo import grpo_config, length_reward

_GEMMA = dict(mlp_activation="gelu_tanh", tie_embeddings=True, sliding_window=6,
              layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=16.0)
FEATURES = {
    "qwen3": dict(head_dim=24),
    "phi3": dict(sliding_window=6),
    "gemma2": dict(_GEMMA, attn_logit_softcap=50.0, final_logit_softcap=30.0),
    "gemma3": dict(_GEMMA, rope_local_theta=10000.0, rope_theta=1e6),
    "qwen3_moe": dict(qk_norm=True, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, mlp_only_layers=(0,), router_aux_loss_coef=0.01),
    "mixtral": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                    intermediate_size=32, moe_intermediate_size=32, router_aux_loss_coef=0.01),
}
"""Per family, the features beyond ``TRAITS`` its tiny model exercises."""


def family_spec(family: str) -> ModelSpec:
    over = dict(TINY.overrides) | {"family": family, "num_layers": 2} | TRAITS[family]
    return dataclasses.replace(TINY, overrides=over | FEATURES[family])


DEFAULT = ("gemma3", "qwen3_moe")
"""Run by default (CI): the dense family with the most switches and a MoE family; the others
with -m slow (their parity, round trip and sampler tests run by default in tests/models)."""


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=() if f in DEFAULT else pytest.mark.slow) for f in sorted(FEATURES)])
def test_family_sft_then_grpo(world, family):
    cfg = sft_config(world.root, world.tokenizer, world.pref["sft"], f"family_sft_{family}",
                     steps=2, model=family_spec(family))
    res = sft.run(cfg)
    rows = train_rows(res["run_dir"])
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    if FEATURES[family].get("num_experts"):  # the load-balancing term is in the loss
        assert all(r["loss"] == pytest.approx(r["nll"] + r["moe_aux_loss"], rel=1e-5)
                   for r in rows)
        assert all(r["moe_aux_loss"] > 0 for r in rows)
    config, _ = load_hf_checkpoint(res["model_dir"])
    assert config.family == family
    for field, value in (TRAITS[family] | FEATURES[family]).items():
        assert getattr(config, field) == value, field
    g = grpo.run(grpo_config(world, f"family_grpo_{family}", kl=KLConfig(coef=0.05),
                             policy=ModelSpec(path=res["model_dir"]),
                             sampling=GenerationConfig(max_new_tokens=4)),
                 reward_fns={"exact_match": exact_match_reward, "length": length_reward})
    for r in train_rows(g["run_dir"]):
        assert np.isfinite(r["loss"]) and r["logprob_diff_sampler_trainer"] < 1e-4
