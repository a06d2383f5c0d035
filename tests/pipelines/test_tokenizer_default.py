"""The stages' tokenizer: by default the checkpoint's own (``tokenizer=None``), refused for a
preset, and checked against every checkpoint's own ``tokenizer.json`` (vocabulary and special
ids), all before the run directory is written. One short SFT run shows the default end to end:
its export keeps the base checkpoint's generation settings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from rlhf_jax.data import Tokenizer, train_bpe_tokenizer
from rlhf_jax.pipelines import DataConfig, ModelSpec, RewardConfig, dpo, grpo, reward_model, sft
from rlhf_jax.pipelines.setup import load_tokenizer

from .common import assert_run_outputs
from .conftest import loop

CORPUS = [f"the cat sat on mat {i} and the dog ran {i % 7} times" for i in range(200)]
DATA = DataConfig(train="never-read.jsonl")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """Checkpoint-like directories holding only a tokenizer (all ``load_tokenizer`` reads):
    ``a`` and its copy ``a2``, ``b`` with a smaller vocabulary, ``empty`` with none."""
    root = tmp_path_factory.mktemp("toks")
    out = {name: str(root / name) for name in ("a", "a2", "b", "empty")}
    train_bpe_tokenizer(CORPUS, vocab_size=300).save(out["a"])
    train_bpe_tokenizer(CORPUS, vocab_size=300).save(out["a2"])
    train_bpe_tokenizer(CORPUS, vocab_size=280).save(out["b"])
    os.makedirs(out["empty"])
    return out


def test_default_is_the_checkpoint_tokenizer(dirs):
    tok = load_tokenizer(None, "policy", ModelSpec(path=dirs["a"]))
    assert tok == Tokenizer.load(dirs["a"])
    dotted = os.path.join(dirs["empty"], "..", "a")  # a path with '..' is resolved first
    assert load_tokenizer(None, "model", ModelSpec(path=dotted)) == tok
    # a given tokenizer equal to the checkpoint's own, or the same directory, is fine
    assert load_tokenizer(dirs["a2"], "policy", ModelSpec(path=dirs["a"])) == tok
    assert load_tokenizer(dirs["a"], "policy", ModelSpec(path=dirs["a"])) == tok
    # a checkpoint without tokenizer.json is not checked (the given one is used)
    assert load_tokenizer(dirs["b"], "policy", ModelSpec(path=dirs["empty"])).vocab_size == 280


def test_default_needs_a_checkpoint_with_a_tokenizer(dirs):
    with pytest.raises(ValueError, match="tokenizer is None, so it would be the student "
                                         "checkpoint's own, but student is the preset "
                                         "'toy-1m' .*set tokenizer"):
        load_tokenizer(None, "student", ModelSpec())
    with pytest.raises(FileNotFoundError, match="read from policy.path .* which has no "
                                                "tokenizer.json"):
        load_tokenizer(None, "policy", ModelSpec(path=dirs["empty"]))


def test_a_given_tokenizer_must_match_the_checkpoint(dirs):
    with pytest.raises(ValueError, match=r"the given tokenizer and the policy checkpoint's "
                                         r"tokenizer differ .*vocab_size 280 vs 300.*"
                                         r"\(tokenizer='.*b', policy.path='.*a'\)"):
        load_tokenizer(dirs["b"], "policy", ModelSpec(path=dirs["a"]))


def test_other_checkpoints_must_match_too(dirs):
    others = {"reference": None, "rewards.model": ModelSpec(path=dirs["b"])}
    with pytest.raises(ValueError, match=r"the policy's tokenizer and the rewards.model "
                                         r"checkpoint's tokenizer differ .*vocab_size 300 vs "
                                         r"280.*\(policy.path='.*a', rewards.model.path="):
        load_tokenizer(None, "policy", ModelSpec(path=dirs["a"]), others=others)
    load_tokenizer(None, "policy", ModelSpec(path=dirs["a"]),
                   others={"rewards.model": ModelSpec(path=dirs["a2"])})


def _refused_before_writing(run, cfg, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not os.path.exists(cfg.output_dir)


def test_stages_refuse_before_writing_anything(tmp_path, dirs):
    out = str(tmp_path / "run")
    _refused_before_writing(sft.run, sft.SFTConfig(data=DATA, output_dir=out),
                            "model is the preset 'toy-1m'")
    _refused_before_writing(reward_model.run, reward_model.RewardModelConfig(
        data=DATA, output_dir=out, tokenizer=dirs["b"], model=ModelSpec(path=dirs["a"])),
        "vocab_size 280 vs 300")
    _refused_before_writing(dpo.run, dpo.DPOConfig(
        data=DATA, output_dir=out, policy=ModelSpec(path=dirs["a"]),
        reference=ModelSpec(path=dirs["b"])), "the reference checkpoint's tokenizer")
    grpo_cfg = grpo.GRPOConfig(data=DATA, output_dir=out, policy=ModelSpec(),
                               rewards=RewardConfig(functions=("exact_match",)))
    _refused_before_writing(grpo.run, grpo_cfg, "policy is the preset")
    _refused_before_writing(grpo.run, dataclasses.replace(
        grpo_cfg, policy=ModelSpec(path=dirs["a"]),
        rewards=RewardConfig(model=ModelSpec(path=dirs["b"]))), "rewards.model checkpoint's")


def test_sft_from_a_checkpoint_uses_its_tokenizer_and_generation_settings(world, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(world.sft["model_dir"], base)
    with open(os.path.join(base, "generation_config.json"), encoding="utf-8") as f:
        generation = json.load(f)
    with open(os.path.join(base, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation | {"temperature": 0.7, "top_p": 0.8}, f)
    cfg = dataclasses.replace(world.sft_cfg, tokenizer=None, model=ModelSpec(path=base),
                              output_dir=str(tmp_path / "sft"), loop=loop(2))
    result = sft.run(cfg)
    assert_run_outputs(result, steps=2, kind="SFTConfig")
    tok = Tokenizer.load(world.tokenizer)
    assert Tokenizer.load(result["model_dir"]) == tok
    with open(os.path.join(result["model_dir"], "generation_config.json"),
              encoding="utf-8") as f:
        exported = json.load(f)
    assert exported == generation | {"temperature": 0.7, "top_p": 0.8}
    assert exported["eos_token_id"] == list(tok.eos_ids)
