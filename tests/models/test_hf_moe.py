"""Hugging Face import/export of the mixture-of-experts families, Qwen3-MoE and Mixtral. Parity,
greedy decoding, round trips and the live transformers check run for them in ``test_hf.py``;
this file holds what is specific: each MoE feature read from the fixture, the per-expert tensor
names (``models.moe.hf_moe_keys``), transformers' config aliases and defaults, and the refused
fields and configs."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import moe
from rlhf_jax.models.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _copy(family: str, dst: pathlib.Path) -> pathlib.Path:
    out = dst / family
    shutil.copytree(FIXTURES / family, out)
    return out


def _hf(family: str) -> dict:
    return json.loads((FIXTURES / family / "config.json").read_text())


def test_fixture_configs_map_every_moe_feature():
    qwen, _ = load_hf_checkpoint(FIXTURES / "qwen3_moe")
    assert qwen.mlp_kinds() == ("dense", "moe") and qwen.mlp_only_layers == (0,)
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (4, 2, 32)
    assert qwen.intermediate_size == 128 and not qwen.norm_topk_prob and qwen.qk_norm
    assert qwen.head_dim == 32 and qwen.router_aux_loss_coef == 0.001
    mixtral, _ = load_hf_checkpoint(FIXTURES / "mixtral")
    assert mixtral.mlp_kinds() == ("moe", "moe") and mixtral.norm_topk_prob
    assert mixtral.intermediate_size == mixtral.expert_size == 32 and mixtral.num_experts == 4
    assert mixtral.sliding_window is None and mixtral.rope_theta == 1e6
    assert mixtral.head_dim is None and not mixtral.qk_norm


@pytest.mark.parametrize("family,block", [("qwen3_moe", "mlp"), ("mixtral", "block_sparse_moe")])
def test_expert_tensors_are_the_hub_names_and_stack_in_order(family, block):
    config, params = load_hf_checkpoint(FIXTURES / family, dtype="float32")
    stored = load_file(str(FIXTURES / family / "model.safetensors"))
    for i, kind in enumerate(config.mlp_kinds()):
        prefix = f"model.layers.{i}.{block}"
        keys = moe.hf_moe_keys(prefix, family=family, num_experts=4)
        assert set(keys) <= set(stored) if kind == "moe" else not set(keys) & set(stored)
        if kind == "moe":  # the same conversion as moe.moe_params_from_hf
            want = moe.moe_params_from_hf(stored, prefix, family=family, num_experts=4)
            got = params["layers"][i]["mlp"]
            for name in ("gate_proj", "up_proj", "down_proj"):
                np.testing.assert_array_equal(got[name], want[name].astype(np.float32))
            np.testing.assert_array_equal(got["router"]["kernel"],
                                          want["router"]["kernel"].astype(np.float32))


def test_num_experts_aliases_and_transformers_defaults():
    hf = _hf("qwen3_moe")
    both = dict(hf, num_experts=hf["num_local_experts"])
    assert config_from_hf(both) == config_from_hf(hf)
    alias = {k: v for k, v in both.items() if k != "num_local_experts"}
    assert config_from_hf(alias) == config_from_hf(hf)
    with pytest.raises(ValueError, match="'num_experts/num_local_experts'"):
        config_from_hf(dict(hf, num_experts=8))
    sparse = {k: v for k, v in _hf("mixtral").items() if k not in (
        "rope_parameters", "rms_norm_eps", "num_local_experts", "num_experts_per_tok")}
    c = config_from_hf(sparse)  # MixtralConfig's defaults: RoPE base 1e6, eps 1e-5, 8 top-2
    assert (c.rope_theta, c.rms_norm_eps, c.num_experts, c.num_experts_per_tok) == (
        1e6, 1e-5, 8, 2)
    sparse = {k: v for k, v in hf.items() if k not in (
        "norm_topk_prob", "num_local_experts", "num_experts_per_tok", "mlp_only_layers",
        "decoder_sparse_step", "moe_intermediate_size")}
    c = config_from_hf(sparse)  # Qwen3MoeConfig's: 128 experts, top-8, width 768, all sparse
    assert (c.num_experts, c.num_experts_per_tok, c.expert_size, c.norm_topk_prob) == (
        128, 8, 768, False)
    assert set(c.mlp_kinds()) == {"moe"}


def test_exported_config_json_is_what_transformers_reads():
    qwen, _ = load_hf_checkpoint(FIXTURES / "qwen3_moe")
    hf = config_to_hf(qwen)
    assert hf["architectures"] == ["Qwen3MoeForCausalLM"] and hf["num_experts"] == 4
    assert hf["mlp_only_layers"] == [0] and hf["moe_intermediate_size"] == 32
    assert hf["norm_topk_prob"] is False and hf["intermediate_size"] == 128
    mixtral, _ = load_hf_checkpoint(FIXTURES / "mixtral")
    hf = config_to_hf(mixtral)
    assert hf["architectures"] == ["MixtralForCausalLM"] and hf["num_local_experts"] == 4
    assert hf["intermediate_size"] == 32 and hf["sliding_window"] is None
    assert hf["router_jitter_noise"] == 0.0


@pytest.mark.parametrize("family,change,field", [
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_moe", {"model_type": "qwen3"}, "model_type"),
])
def test_unsupported_moe_fields_are_named(tmp_path, family, change, field):
    ckpt = _copy(family, tmp_path)
    (ckpt / "config.json").write_text(json.dumps(dict(_hf(family), **change)))
    with pytest.raises(ValueError, match=f"'{field}'"):
        load_hf_checkpoint(ckpt)


def test_missing_or_misshapen_expert_tensors_are_named(tmp_path):
    ckpt = _copy("mixtral", tmp_path)
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(path))
    with pytest.raises(ValueError, match=r"missing tensors: \['model\.layers\.1\.block_sparse_"
                                         r"moe\.experts\.3\.w2\.weight'\]"):
        load_hf_checkpoint(ckpt)
    save_file(dict(tensors, **{name: tensors[name][:, :16]}), str(path))
    with pytest.raises(ValueError, match=r"w2\.weight' has shape \[64, 16\], expected "
                                         r"\[64, 32\]"):
        load_hf_checkpoint(ckpt)
    extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"  # a fifth expert
    save_file(dict(tensors, **{extra: tensors[name]}), str(path))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_hf_checkpoint(ckpt)


def test_export_refuses_expert_configs_without_hf_equivalent(tmp_path):
    mixtral, params = load_hf_checkpoint(FIXTURES / "mixtral")
    with pytest.raises(ValueError, match="mixtral' needs mlp_only_layers"):
        save_hf_checkpoint(tmp_path, mixtral.replace(mlp_only_layers=(0,)), params)
    with pytest.raises(ValueError, match="mixtral' needs norm_topk_prob"):
        save_hf_checkpoint(tmp_path, mixtral.replace(norm_topk_prob=False), params)
    with pytest.raises(ValueError, match="mixtral' needs intermediate_size"):
        save_hf_checkpoint(tmp_path, mixtral.replace(intermediate_size=64), params)
    with pytest.raises(ValueError, match="num_experts=4 has no Hugging Face"):
        save_hf_checkpoint(tmp_path, mixtral.replace(family="mistral"), params)
    with pytest.raises(ValueError, match="num_experts=0 has no Hugging Face"):
        save_hf_checkpoint(tmp_path, mixtral.replace(num_experts=0), params)
    assert not any(tmp_path.iterdir())  # refused before anything is written
