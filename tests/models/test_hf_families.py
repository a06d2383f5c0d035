"""Hugging Face import/export of the families added to the Llama-style decoder: Qwen3, Phi-3,
Gemma 2 and Gemma 3 (text). Parity, greedy decoding, round trips and the live transformers check
run for every family in ``test_hf.py``; this file holds what is specific to them: each feature
read from the fixture, Phi-3's fused tensors, Gemma's norm names, transformers 4 config layouts
and the refused fields.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import RopeScaling
from rlhf_jax.models.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _copy(family: str, dst: pathlib.Path) -> pathlib.Path:
    out = dst / family
    shutil.copytree(FIXTURES / family, out)
    return out


def _edit_weights(ckpt: pathlib.Path, edit) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


def test_fixture_configs_map_every_new_feature():
    qwen3, _ = load_hf_checkpoint(FIXTURES / "qwen3")
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.tie_embeddings
    assert not (qwen3.qkv_bias or qwen3.norm_unit_offset or qwen3.sandwich_norms)
    phi3, _ = load_hf_checkpoint(FIXTURES / "phi3")
    assert phi3.sliding_window == 6 and phi3.layer_types is None and not phi3.qk_norm
    gemma2, _ = load_hf_checkpoint(FIXTURES / "gemma2")
    assert gemma2.layer_types == ("sliding_attention", "full_attention")
    assert gemma2.layer_is_sliding() == (True, False) and gemma2.sliding_window == 6
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (1.0, 2.0)
    assert gemma2.query_pre_attn_scalar == 24 and gemma2.mlp_activation == "gelu_tanh"
    assert gemma2.norm_unit_offset and gemma2.sandwich_norms and gemma2.scale_embeddings
    assert gemma2.tie_embeddings and not gemma2.qk_norm
    gemma3, _ = load_hf_checkpoint(FIXTURES / "gemma3")
    assert gemma3.qk_norm and gemma3.attn_logit_softcap is None
    assert gemma3.final_logit_softcap is None
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)
    assert gemma3.rope_scaling == RopeScaling(rope_type="linear", factor=8.0)


@pytest.mark.parametrize("family", ["phi3", "gemma2", "gemma3", "qwen3", "qwen3_moe",
                                    "mixtral"])
def test_export_writes_the_checkpoint_tensors_back_bit_for_bit(tmp_path, family):
    """Phi-3's fused ``qkv_proj``/``gate_up_proj`` are re-fused exactly; Gemma's four norms per
    block go back under their own names; the stacked experts go back one tensor per expert."""
    config, params = load_hf_checkpoint(FIXTURES / family)
    save_hf_checkpoint(tmp_path, config, params)
    want, got = load_file(str(FIXTURES / family / "model.safetensors")), load_file(
        str(tmp_path / "model.safetensors"))
    assert sorted(want) == sorted(got)
    for name in want:
        assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
        assert want[name].tobytes() == got[name].tobytes(), name


def test_phi3_fused_tensors_are_split_in_order():
    config, params = load_hf_checkpoint(FIXTURES / "phi3", dtype="float32")
    stored = load_file(str(FIXTURES / "phi3" / "model.safetensors"))
    qkv = stored["model.layers.1.self_attn.qkv_proj.weight"].astype(np.float32)  # [(H + 2Hkv)K, D]
    q, k = config.num_heads * config.dim_per_head, config.num_kv_heads * config.dim_per_head
    attn = params["layers"][1]["attn"]
    np.testing.assert_array_equal(attn["q_proj"]["kernel"], qkv[:q].T)
    np.testing.assert_array_equal(attn["k_proj"]["kernel"], qkv[q:q + k].T)
    np.testing.assert_array_equal(attn["v_proj"]["kernel"], qkv[q + k:].T)
    gate_up = stored["model.layers.0.mlp.gate_up_proj.weight"].astype(np.float32)
    f = config.intermediate_size
    np.testing.assert_array_equal(params["layers"][0]["mlp"]["gate_proj"]["kernel"], gate_up[:f].T)
    np.testing.assert_array_equal(params["layers"][0]["mlp"]["up_proj"]["kernel"], gate_up[f:].T)

@pytest.mark.parametrize("family,change,field", [
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                  "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "rope_parameters.rope_type"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                  "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma2", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention.rope_type"),
    ("gemma3", {"model_type": "gemma3"}, "model_type"),
])
def test_unsupported_new_family_fields_are_named(tmp_path, family, change, field):
    ckpt = _copy(family, tmp_path)
    hf = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(hf, **change)))
    with pytest.raises(ValueError, match=f"'{field}'"):
        load_hf_checkpoint(ckpt)


def test_phi3_fused_tensor_of_the_wrong_size_is_named(tmp_path):
    ckpt = _copy("phi3", tmp_path)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    _edit_weights(ckpt, lambda t: t.update({name: t[name][:-16]}))
    with pytest.raises(ValueError, match=r"qkv_proj\.weight' has shape \[112, 64\], expected "
                                         r"\[128, 64\]"):
        load_hf_checkpoint(ckpt)


def test_transformers_4_gemma_configs_read_like_transformers_5(tmp_path):
    """Gemma 3 configs written by transformers 4 keep ``rope_theta``, ``rope_local_base_freq``
    and ``rope_scaling`` at the top level and may lack ``layer_types`` (a period of
    ``sliding_window_pattern``); Gemma 2's lack it too (period 2)."""
    ckpt = _copy("gemma3", tmp_path)
    hf = json.loads((ckpt / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf.pop("layer_types")
    hf.update(rope_theta=rope["full_attention"]["rope_theta"],
              rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
              rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=2)
    (ckpt / "config.json").write_text(json.dumps(hf))
    assert load_hf_checkpoint(ckpt)[0] == load_hf_checkpoint(FIXTURES / "gemma3")[0]
    gemma2 = json.loads((FIXTURES / "gemma2" / "config.json").read_text())
    gemma2.pop("layer_types")
    assert config_from_hf(gemma2) == load_hf_checkpoint(FIXTURES / "gemma2")[0]
