"""Hugging Face import/export: parity with transformers, exact round trips, refused inputs.

The fixtures in ``tests/fixtures/hf/`` were made by ``tools/make_hf_fixtures.py`` with
transformers (eager attention, float32); see that script for what each family exercises.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from rlhf_jax.models import ModelConfig, RopeScaling, init_model
from rlhf_jax.models.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma2", "gemma3", "qwen3_moe",
            "mixtral")


def _reference(family: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / family / "reference.npz", allow_pickle=False) as f:
        return dict(f)


def _model(config: ModelConfig):
    return init_model(config, jax.random.PRNGKey(0))[0]


def _logits(config, params, ids, mask) -> np.ndarray:
    model = _model(config)
    hidden = model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).hidden
    return np.asarray(model.logits(params, hidden))


def _assert_trees_equal(a, b) -> None:
    """Bitwise: same structure, dtypes and shapes, and the same bytes in every leaf (so -0.0 is
    not 0.0 and NaN payloads count), which ``chex.assert_trees_all_equal`` would not check."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_equal_comparator(
        lambda x, y: np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)),
        lambda x, y: "leaves differ bitwise", a, b)


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family):
    ref = _reference(family)
    config, params = load_hf_checkpoint(FIXTURES / family, dtype="float32")
    logits = _logits(config, params, ref["input_ids"], ref["attention_mask"])
    real = ref["attention_mask"].astype(bool)  # padding positions are not compared
    assert np.abs(logits - ref["logits"])[real].max() <= 1e-4


def test_fixture_configs_map_every_feature():
    llama, _ = load_hf_checkpoint(FIXTURES / "llama")
    qwen, _ = load_hf_checkpoint(FIXTURES / "qwen2")
    mistral, _ = load_hf_checkpoint(FIXTURES / "mistral")
    assert llama.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16)
    assert llama.tie_embeddings and llama.rope_theta == 500000.0 and not llama.qkv_bias
    assert qwen.qkv_bias and not qwen.tie_embeddings and qwen.sliding_window is None
    assert mistral.sliding_window == 6 and mistral.rms_norm_eps == 1e-5
    assert llama.param_dtype == llama.dtype == "bfloat16"  # the checkpoint's dtype by default


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_with_cache_matches_transformers_generate(family):
    ref = _reference(family)
    config, params = load_hf_checkpoint(FIXTURES / family, dtype="float32")
    model = _model(config)
    prompt, steps = jnp.asarray(ref["prompt"]), ref["greedy"].shape[1]

    @jax.jit
    def step(params, tokens, cache):
        out = model.apply(params, tokens, cache=cache)
        return jnp.argmax(model.logits(params, out.hidden)[:, -1], axis=-1), out.cache

    token, cache = step(params, prompt, model.init_cache(1, prompt.shape[1] + steps))
    generated = [token]
    for _ in range(steps - 1):
        token, cache = step(params, token[:, None], cache)
        generated.append(token)
    np.testing.assert_array_equal(np.stack(generated, axis=1), ref["greedy"])


# ---------------------------------------------------------------- exact round trips
@pytest.mark.parametrize("family,shard", [("llama", None), ("qwen2", None), ("mistral", 40_000),
                                          ("qwen3", None), ("phi3", 60_000), ("gemma2", None),
                                          ("gemma3", None), ("qwen3_moe", 50_000),
                                          ("mixtral", None)])
def test_import_export_import_is_exact(tmp_path, family, shard):
    config, params = load_hf_checkpoint(FIXTURES / family)
    save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=shard)
    again_config, again = load_hf_checkpoint(tmp_path)
    assert again_config == config
    _assert_trees_equal(params, again)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (tmp_path / "model.safetensors").exists()


def test_float32_export_then_unsharded_reexport_replaces_layout(tmp_path):
    config, params = load_hf_checkpoint(FIXTURES / "qwen2", dtype="float32")
    save_hf_checkpoint(tmp_path, config, params, max_shard_bytes=50_000)
    save_hf_checkpoint(tmp_path, config, params)  # the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again_config, again = load_hf_checkpoint(tmp_path)
    assert again_config == config
    _assert_trees_equal(params, again)


@pytest.mark.parametrize("heads", [("lm", "value"), ("reward",), ("value", "reward")])
def test_heads_round_trip(tmp_path, heads):
    config = ModelConfig(family="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=4, num_kv_heads=2, sliding_window=4,
                         heads=heads)
    _, params = init_model(config, jax.random.PRNGKey(1))
    save_hf_checkpoint(tmp_path, config, params)
    hf = json.loads((tmp_path / "config.json").read_text())
    arch = "MistralForCausalLM" if "lm" in heads else "MistralForSequenceClassification"
    assert hf["architectures"] == [arch]
    assert (tmp_path / "value_head.safetensors").exists() == ("value" in heads)
    again_config, again = load_hf_checkpoint(tmp_path)
    assert again_config == config
    _assert_trees_equal(params, again)


def test_requested_heads_missing_from_checkpoint_start_at_zero():
    config, params = load_hf_checkpoint(FIXTURES / "llama", heads=("reward", "value"))
    assert config.heads == ("reward", "value") and "lm_head" not in params
    assert not np.any(np.asarray(params["reward_head"]["kernel"]))
    assert not np.any(np.asarray(params["value_head"]["bias"]))
    hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
    hf.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"})
    with pytest.raises(ValueError, match="has no LM head"):
        config_from_hf(hf, heads=("lm",))
    with pytest.raises(ValueError, match="'id2label/num_labels'"):
        config_from_hf(dict(hf, id2label={"0": "A", "1": "B"}))


# ---------------------------------------------------------------- refused inputs
def _copy(family: str, dst: pathlib.Path) -> pathlib.Path:
    out = dst / family
    shutil.copytree(FIXTURES / family, out)
    return out


def test_pickle_only_directory_is_refused_with_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "llama" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="safe_serialization=True"):
        load_hf_checkpoint(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("entry", ["../evil.safetensors", "/abs.safetensors",
                                   "sub/../../evil.safetensors", "C:\\evil.safetensors",
                                   "escape.safetensors"])
def test_bad_shard_names_are_refused_before_opening(tmp_path, entry):
    ckpt = _copy("qwen2", tmp_path)
    outside = tmp_path / "evil.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(outside))
    (ckpt / "escape.safetensors").symlink_to(outside)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = entry
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="weight_map entry") as err:
        load_hf_checkpoint(ckpt)
    assert repr(entry) in str(err.value)


def test_escaping_symlinked_single_file_is_refused(tmp_path):
    ckpt = _copy("llama", tmp_path)
    target = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(target)
    (ckpt / "model.safetensors").symlink_to(target)
    with pytest.raises(ValueError, match="outside"):
        load_hf_checkpoint(ckpt)


def _edit_weights(ckpt: pathlib.Path, edit) -> None:
    from safetensors.numpy import load_file
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing tensors: \['model\.layers\.1\.mlp\.up_proj\.weight'\]"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(2, np.float32)}),
     r"unexpected tensors: \['model\.layers\.0\.extra\.weight'\]"),
    (lambda t: t.update({"model.norm.weight": np.zeros(65, np.float32)}),
     r"'model\.norm\.weight' has shape \[65\], expected \[64\]"),
    (lambda t: t.update({"lm_head.weight": np.zeros((256, 64), np.float32)}),
     "lm_head.weight differs"),
])
def test_bad_tensors_are_named(tmp_path, edit, match):
    ckpt = _copy("llama", tmp_path)
    _edit_weights(ckpt, edit)
    with pytest.raises(ValueError, match=match):
        load_hf_checkpoint(ckpt)


def test_harmless_rotary_buffers_are_ignored(tmp_path):
    ckpt = _copy("llama", tmp_path)
    _edit_weights(ckpt, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    load_hf_checkpoint(ckpt)


@pytest.mark.parametrize("change,field", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters.rope_type"),
    ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic",
                                                                     "factor": 2.0}},
     "rope_scaling.rope_type"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_config_fields_are_named(tmp_path, change, field):
    ckpt = _copy("llama", tmp_path)
    hf = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(hf, **change)))
    with pytest.raises(ValueError, match=f"'{field}'"):
        load_hf_checkpoint(ckpt)


def test_legacy_rope_layout_and_qwen2_sliding_window(tmp_path):
    ckpt = _copy("llama", tmp_path)
    hf = json.loads((ckpt / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf.update(rope_theta=rope.pop("rope_theta"), rope_scaling=dict(rope))
    (ckpt / "config.json").write_text(json.dumps(hf))
    assert load_hf_checkpoint(ckpt)[0] == load_hf_checkpoint(FIXTURES / "llama")[0]
    qwen = _copy("qwen2", tmp_path)
    hf = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(dict(hf, use_sliding_window=True)))
    with pytest.raises(ValueError, match="'use_sliding_window'"):
        load_hf_checkpoint(qwen)


def test_export_refuses_escaping_symlink_and_creates_directory(tmp_path):
    config, params = load_hf_checkpoint(FIXTURES / "llama")
    out = tmp_path / "new" / "dir"
    save_hf_checkpoint(out, config, params)  # created
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(victim)
    with pytest.raises(ValueError, match="outside"):
        save_hf_checkpoint(out, config, params)
    assert victim.read_text() == "keep me"


def test_export_refuses_configs_without_hf_equivalent(tmp_path):
    config, params = load_hf_checkpoint(FIXTURES / "llama")
    with pytest.raises(ValueError, match="qkv_bias"):
        save_hf_checkpoint(tmp_path, config.replace(qkv_bias=True), params)
    with pytest.raises(ValueError, match="params do not match"):
        save_hf_checkpoint(tmp_path, config.replace(tie_embeddings=False), params)
    with pytest.raises(ValueError, match="final_logit_softcap is exported for families"):
        save_hf_checkpoint(tmp_path, config.replace(final_logit_softcap=30.0), params)
    gemma, gparams = load_hf_checkpoint(FIXTURES / "gemma2")
    with pytest.raises(ValueError, match="norm_unit_offset"):
        save_hf_checkpoint(tmp_path, gemma.replace(norm_unit_offset=False), gparams)
    phi3, pparams = load_hf_checkpoint(FIXTURES / "phi3")
    with pytest.raises(ValueError, match="plain RoPE"):
        save_hf_checkpoint(tmp_path, phi3.replace(rope_scaling=RopeScaling(
            rope_type="linear", factor=2.0)), pparams)


# ---------------------------------------------------------------- live transformers checks
_TORCH_CHECK = """
import sys, numpy as np, torch, transformers
d, npz = sys.argv[1], sys.argv[2]
ref = np.load(npz, allow_pickle=False)
cls = getattr(transformers, ref["auto_class"].item())
model, info = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                  output_loading_info=True)
bad = {k: v for k, v in info.items() if v}
assert not bad, bad
ids = torch.tensor(ref["input_ids"]).long()
mask = torch.tensor(ref["attention_mask"]).long()
pos = (mask.cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    if hasattr(model, "score"):  # per-position scores (pooling needs a pad id we do not set)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        out = model.score(h).numpy()
    else:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
print(float(np.abs(out - ref["ours"])[ref["compare"]].max()))
"""


def _export_cases():
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


@pytest.mark.parametrize("family,heads", [(f, ("lm",)) for f in FAMILIES] + [
    ("qwen2", ("reward",)), ("gemma2", ("reward",)), ("gemma3", ("reward",)),
    ("phi3", ("reward",)), ("qwen3_moe", ("reward",)), ("mixtral", ("reward",))])
def test_transformers_loads_our_export(tmp_path, family, heads):
    python = os.environ.get("RLHF_JAX_TORCH_PYTHON")
    if not python:
        pytest.skip("set RLHF_JAX_TORCH_PYTHON to an interpreter with torch + transformers")
    config, params = load_hf_checkpoint(FIXTURES / family, dtype="float32", heads=heads)
    if "reward" in heads:  # a non-zero score head, so the check means something
        params["reward_head"]["kernel"] = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (64, 1))
    save_hf_checkpoint(tmp_path / "ckpt", config, params, max_shard_bytes=60_000)
    ids, mask = _export_cases()
    model = _model(config)
    hidden = model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).hidden
    if "lm" in heads:
        ours, compare, auto = np.asarray(model.logits(params, hidden)), mask.astype(bool), \
            "AutoModelForCausalLM"
    else:  # HF scores every position; our reward reads the last one (no padding at the end)
        ours = np.asarray(hidden @ params["reward_head"]["kernel"])
        compare, auto = mask.astype(bool), "AutoModelForSequenceClassification"
    np.savez(tmp_path / "ours.npz", input_ids=ids, attention_mask=mask, ours=ours,
             compare=compare, auto_class=np.array(auto))
    proc = subprocess.run([python, "-c", _TORCH_CHECK, str(tmp_path / "ckpt"),
                           str(tmp_path / "ours.npz")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-4


def test_live_transformers_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    config, params = load_hf_checkpoint(tmp_path / "hf", dtype="float32")
    save_hf_checkpoint(tmp_path / "ours", config, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours",
                                                             attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 10))
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)).logits.numpy()
        again = back(torch.tensor(ids)).logits.numpy()
    ours = _logits(config, params, ids, np.ones_like(ids))
    assert np.abs(ours - want).max() <= 1e-4 and np.abs(again - want).max() <= 1e-5
