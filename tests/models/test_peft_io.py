"""PEFT adapter files (``models.peft_io``): PEFT's names and layout, a bitwise round trip,
refused options and tensors, and logits equal to the ``peft`` library's both ways (1e-4; measured
1.3e-6 ours -> PEFT and 3.0e-6 PEFT -> ours on the llama fixture). The live test runs where torch,
transformers and peft are installed (``pip install -e ".[bench]"``: peft 0.21.2)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from rlhf_jax.models.lora import LoraConfig, combine, lora_model
from rlhf_jax.models.peft_io import load_peft_adapter, save_peft_adapter
from tests.models.test_lora import FIXTURE, _llama, _logits, _random_adapter, _tokens


# ---------------------------------------------------------------- PEFT files
def test_peft_export_import_is_bitwise(tmp_path):
    base_model, _ = _llama()
    model = lora_model(base_model, LoraConfig(rank=4, alpha=8.0, dropout=0.1, rslora=True,
                                              targets=("q_proj", "v_proj", "down_proj")))
    ad = _random_adapter(model)
    save_peft_adapter(tmp_path, model, ad, base_model_name_or_path="fixtures/llama")
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (hf["peft_type"], hf["task_type"], hf["r"], hf["lora_alpha"], hf["use_rslora"],
            hf["lora_dropout"], hf["target_modules"], hf["base_model_name_or_path"]) == (
        "LORA", "CAUSAL_LM", 4, 8.0, True, 0.1, ["down_proj", "q_proj", "v_proj"],
        "fixtures/llama")
    from safetensors.numpy import load_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_"
    assert tensors[name + "A.weight"].shape == (4, 64) and tensors[name + "B.weight"].shape == (
        64, 4)
    again, back = load_peft_adapter(tmp_path, base_model.config)
    assert again == model
    assert load_peft_adapter(tmp_path, base_model.config, quantize_base="nf4")[0] == lora_model(
        base_model, dataclasses.replace(model.lora, quantize_base="nf4"))
    assert jax.tree.structure(back) == jax.tree.structure(ad)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", True, "'use_dora' = True"), ("bias", "all", "'bias' = 'all'"),
    ("modules_to_save", ["lm_head"], "'modules_to_save'"), ("peft_type", "IA3", "'peft_type'"),
    ("target_modules", "all-linear", "'target_modules'"),
    ("rank_pattern", {"q_proj": 8}, "'rank_pattern'"),
    ("init_lora_weights", "pissa", "changes the base weights"),
    ("use_some_future_variant", True, "'use_some_future_variant' = True")])
def test_peft_import_refuses_unsupported_options(tmp_path, field, value, match):
    base_model, _ = _llama()
    model = lora_model(base_model, LoraConfig(rank=4, targets=("q_proj",)))
    save_peft_adapter(tmp_path, model, _random_adapter(model))
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**hf, field: value}))
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(tmp_path, base_model.config)


def test_peft_import_checks_tensor_names_and_shapes(tmp_path):
    from safetensors.numpy import load_file, save_file
    base_model, _ = _llama()
    model = lora_model(base_model, LoraConfig(rank=4, targets=("q_proj",)))
    save_peft_adapter(tmp_path, model, _random_adapter(model))
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(path)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**good, name: np.zeros((3, 64), np.float32)}, path)
    with pytest.raises(ValueError, match=r"has shape \[3, 64\], expected \[4, 64\]"):
        load_peft_adapter(tmp_path, base_model.config)
    save_file({k: v for k, v in good.items() if k != name}, path)
    with pytest.raises(ValueError, match="missing.*layers.0.self_attn.q_proj.lora_A"):
        load_peft_adapter(tmp_path, base_model.config)
    save_file({**good, name.replace("q_proj", "k_proj"): good[name]}, path)
    with pytest.raises(ValueError, match="unexpected.*k_proj"):
        load_peft_adapter(tmp_path, base_model.config)


def _hf_logits(hf_model, tokens) -> np.ndarray:
    import torch
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(np.asarray(tokens))).logits.numpy()


def test_peft_library_parity_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base_model, base = _llama()
    tokens = _tokens(base_model.config.vocab_size, (2, 16))

    def hf_base():
        return transformers.AutoModelForCausalLM.from_pretrained(
            FIXTURE, dtype=torch.float32, attn_implementation="eager").eval()

    # ours -> PEFT
    model = lora_model(base_model, LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj",
                                                                          "up_proj")))
    ad = _random_adapter(model)
    save_peft_adapter(tmp_path / "ours", model, ad)
    theirs = peft.PeftModel.from_pretrained(hf_base(), tmp_path / "ours").eval()
    ours = _logits(model, combine(base, ad), tokens)
    assert np.abs(ours - _logits(base_model, base, tokens)).max() > 0.3
    assert np.abs(_hf_logits(theirs, tokens) - ours).max() <= 1e-4  # measured 1.3e-6
    # PEFT -> ours
    torch.manual_seed(0)
    made = peft.get_peft_model(hf_base(), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["k_proj", "v_proj", "gate_proj", "down_proj"],
        use_rslora=True, init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    imported, adapter = load_peft_adapter(tmp_path / "peft", base_model.config)
    assert imported.lora.rank == 3 and imported.lora.rslora
    got = _logits(imported, combine(base, adapter), tokens)
    assert np.abs(got - _logits(base_model, base, tokens)).max() > 0.1
    assert np.abs(_hf_logits(made.eval(), tokens) - got).max() <= 1e-4  # measured 3.0e-6
