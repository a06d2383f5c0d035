"""A stage's exported model directory (``run_dir.export_model``): the tokenizer's bos/eos/pad ids
in ``generation_config.json`` and ``config.json`` over the base model's other generation
settings, one file mode for every file, and transformers loading it and stopping ``generate()``
at ``<|im_end|>``. No training: a tiny model is built and exported directly, in seconds."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import jax
import numpy as np
import pytest

from rlhf_jax.data import Tokenizer, train_bpe_tokenizer
from rlhf_jax.models import get_preset, init_model, load_hf_checkpoint
from rlhf_jax.pipelines.run_dir import export_model

CORPUS = [f"the cat sat on mat {i} and the dog ran {i % 7} times" for i in range(200)]
A, B, C = 100, 101, 102
"""Three plain tokens of the rigged model's chain A -> B -> C -> <|im_end|> -> A -> ..."""


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe_tokenizer(CORPUS, vocab_size=300)  # ChatML: eos_ids (<|eos|>, <|im_end|>)


def _chain_model(tok: Tokenizer):
    """A model whose greedy continuation of A is B, C, <|im_end|>, A, B, ... for ever: every
    block's output projection is zero, so the last hidden state is the token's embedding (a
    basis vector), and the untied LM head maps each chain token to the next."""
    config = get_preset("toy-1m", vocab_size=tok.vocab_size, hidden_size=32,
                        intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                        tie_embeddings=False, dtype="float32", param_dtype="float32")
    _, params = init_model(config, jax.random.PRNGKey(0))
    params = jax.tree.map(np.asarray, params)
    im_end = tok.token_to_id("<|im_end|>")
    chain = [A, B, C, im_end, A]
    embed = np.zeros_like(params["embed"]["embedding"])
    head = np.zeros_like(params["lm_head"]["kernel"])  # [D, V]
    for dim, (token, successor) in enumerate(zip(chain, chain[1:])):
        embed[token, dim] = 1.0
        head[dim, successor] = 10.0
    params["embed"]["embedding"], params["lm_head"]["kernel"] = embed, head
    for layer in params["layers"].values():
        layer["attn"]["o_proj"]["kernel"] = np.zeros_like(layer["attn"]["o_proj"]["kernel"])
        layer["mlp"]["down_proj"]["kernel"] = np.zeros_like(layer["mlp"]["down_proj"]["kernel"])
    return config, params


def _json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_export_writes_token_ids_over_the_base_generation_config(tmp_path, tok):
    config, params = _chain_model(tok)
    base = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": 7, "bos_token_id": 9}
    model_dir = export_model(str(tmp_path / "model"), config, params, tok, generation=base)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.eos_ids),
           "pad_token_id": tok.pad_id}
    assert _json(os.path.join(model_dir, "generation_config.json")) == {
        "temperature": 0.6, "top_p": 0.9} | ids
    hf = _json(os.path.join(model_dir, "config.json"))
    assert {k: hf[k] for k in ids} == ids
    assert Tokenizer.load(model_dir) == tok  # the importers read the directory back
    assert load_hf_checkpoint(model_dir)[0] == config


def test_export_without_base_and_with_one_eos(tmp_path, tok):
    one = dataclasses.replace(tok, eos_ids=(tok.eos_ids[0],), bos_id=None)
    config, params = _chain_model(tok)
    model_dir = export_model(str(tmp_path / "model"), config, params, one)
    assert _json(os.path.join(model_dir, "generation_config.json")) == {
        "eos_token_id": one.eos_ids[0], "pad_token_id": one.pad_id}
    assert "bos_token_id" not in _json(os.path.join(model_dir, "config.json"))
    assert Tokenizer.load(model_dir) == one


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_every_exported_file_gets_the_same_mode(tmp_path, tok, umask):
    """Weights, configs and tokenizer files alike: 0o666 less the umask, as ``open`` gives."""
    config, params = _chain_model(tok)
    old = os.umask(umask)
    try:
        model_dir = export_model(str(tmp_path / "model"), config, params, tok)
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(model_dir, name)).st_mode)
             for name in os.listdir(model_dir)}
    assert {"model.safetensors", "config.json", "tokenizer.json",
            "generation_config.json"} <= modes.keys()
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_transformers_generate_stops_at_im_end(tmp_path, tok):
    """The export loads in transformers (model and tokenizer), and ``generate()`` with the
    exported defaults stops at ``<|im_end|>``, where the same model told to stop only at
    ``<|eos|>`` goes on."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = _chain_model(tok)
    model_dir = export_model(str(tmp_path / "model"), config, params, tok,
                             generation={"max_new_tokens": 9, "do_sample": False})
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    im_end, eos = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|eos|>")
    assert model.generation_config.eos_token_id == [eos, im_end]
    assert (model.generation_config.pad_token_id, model.generation_config.bos_token_id) == (
        tok.pad_id, tok.bos_id)
    assert (hf_tok.eos_token, hf_tok.pad_token, hf_tok.bos_token) == (
        "<|eos|>", "<|pad|>", "<|bos|>")
    assert hf_tok.encode("the cat sat", add_special_tokens=False) == tok.encode("the cat sat")
    prompt = torch.tensor([[tok.bos_id, A]])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt))
        on = model.generate(prompt, attention_mask=torch.ones_like(prompt), eos_token_id=eos)
    assert out[0, 2:].tolist() == [B, C, im_end]  # stopped at <|im_end|>
    assert on[0, 2:].tolist() == [B, C, im_end, A, B, C, im_end, A, B]  # max_new_tokens 9
    assert hf_tok.decode(out[0, 2:], skip_special_tokens=True) == tok.decode([B, C])
