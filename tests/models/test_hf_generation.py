"""``generation_config.json`` in Hugging Face export and import: written with its token ids
also in ``config.json``, read back by ``load_generation_config``, bad ids refused, and the
weights still round-trip bitwise."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from rlhf_jax.models.hf import load_generation_config, load_hf_checkpoint, save_hf_checkpoint

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _json(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def test_generation_config_written_and_ids_copied_to_config(tmp_path):
    config, params = load_hf_checkpoint(FIXTURES / "llama")
    generation = {"temperature": 0.6, "top_p": 0.9, "bos_token_id": 1,
                  "eos_token_id": [2, 5], "pad_token_id": 0}
    save_hf_checkpoint(tmp_path, config, params, generation_config=generation)
    assert load_generation_config(tmp_path) == generation == _json(
        tmp_path / "generation_config.json")
    hf = _json(tmp_path / "config.json")
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, [2, 5], 0)
    again, back = load_hf_checkpoint(tmp_path)  # the importer ignores the ids
    assert again == config
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_generation_config_nothing_is_written_or_removed(tmp_path):
    config, params = load_hf_checkpoint(FIXTURES / "llama")
    save_hf_checkpoint(tmp_path, config, params)
    assert load_generation_config(tmp_path) == {}
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(
        _json(tmp_path / "config.json"))
    (tmp_path / "generation_config.json").write_text('{"top_k": 5}')
    save_hf_checkpoint(tmp_path, config, params)  # an existing file is left alone
    assert load_generation_config(tmp_path) == {"top_k": 5}


def test_none_ids_are_dropped(tmp_path):
    config, params = load_hf_checkpoint(FIXTURES / "llama")
    save_hf_checkpoint(tmp_path, config, params,
                       generation_config={"bos_token_id": None, "eos_token_id": 3})
    assert load_generation_config(tmp_path) == {"eos_token_id": 3}
    assert "bos_token_id" not in _json(tmp_path / "config.json")


@pytest.mark.parametrize("generation,match", [
    ({"eos_token_id": "2"}, "eos_token_id must be a non-negative int or a non-empty list"),
    ({"eos_token_id": []}, "eos_token_id must be"),
    ({"pad_token_id": [0]}, r"pad_token_id must be a non-negative int, got \[0\]"),
    ({"bos_token_id": -1}, "bos_token_id must be"),
    ({"eos_token_id": [2, True]}, "eos_token_id must be"),
])
def test_bad_token_ids_are_refused_before_writing(tmp_path, generation, match):
    config, params = load_hf_checkpoint(FIXTURES / "llama")
    with pytest.raises(ValueError, match=match):
        save_hf_checkpoint(tmp_path / "out", config, params, generation_config=generation)
    assert not (tmp_path / "out").exists()


def test_generation_config_must_be_an_object(tmp_path):
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="generation_config.json .* must hold a JSON object"):
        load_generation_config(tmp_path)
