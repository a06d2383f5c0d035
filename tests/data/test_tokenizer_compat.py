"""``check_compatible`` (same vocabulary and special ids, or an error naming each difference)
and ``generation_config`` (a base generation config with the tokenizer's bos/eos/pad ids), as
``Tokenizer.save`` writes it.

Every tokenizer is trained here from a small corpus: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_jax.data import Tokenizer, train_bpe_tokenizer
from rlhf_jax.data.tokenizer import check_compatible, generation_config

CORPUS = [f"the cat sat on mat {i} and the dog ran {i % 7} times" for i in range(200)]
SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def test_same_vocabulary_and_ids_pass_whatever_the_template(tok):
    check_compatible(tok, train_bpe_tokenizer(CORPUS, vocab_size=300))  # deterministic training
    check_compatible(tok, dataclasses.replace(tok, chat_template="{{ messages }}",
                                              add_bos_token=False))


def test_vocab_size_difference_is_named(tok):
    small = train_bpe_tokenizer(CORPUS, vocab_size=280)
    with pytest.raises(ValueError, match=r"the given tokenizer and the checkpoint's tokenizer "
                                         r"differ \(given vs checkpoint's\): vocab_size 300 vs "
                                         r"280; .*20 tokens only in the given"):
        check_compatible(tok, small)


def test_same_size_but_other_ids_is_refused(tok):
    swapped = train_bpe_tokenizer(CORPUS, vocab_size=300,
                                  special_tokens=SPECIALS[1:2] + SPECIALS[:1] + SPECIALS[2:])
    with pytest.raises(ValueError, match=r"bos_id 1 vs 0; pad_id 0 vs 1; 2 tokens map to "
                                         r"other ids \(e.g. '<\|pad\|>' 0 vs 1\)") as e:
        check_compatible(tok, swapped, names=("sft", "policy"))
    assert "vocab_size" not in str(e.value) and "the sft tokenizer and the policy" in str(e.value)


@pytest.mark.parametrize("change,match", [
    ({"eos_ids": (2,)}, r"eos_ids \(2, 4\) vs \(2,\)"),
    ({"eos_ids": (4, 2)}, r"eos_ids \(2, 4\) vs \(4, 2\)"),
    ({"pad_id": 2}, "pad_id 0 vs 2"),
    ({"bos_id": None}, "bos_id 1 vs None"),
])
def test_special_id_differences_are_named(tok, change, match):
    with pytest.raises(ValueError, match=match) as e:
        check_compatible(tok, dataclasses.replace(tok, **change))
    assert "vocab_size" not in str(e.value) and "map to other ids" not in str(e.value)


def test_several_differences_in_one_message(tok):
    other = dataclasses.replace(train_bpe_tokenizer(CORPUS, vocab_size=290), eos_ids=(2,))
    with pytest.raises(ValueError, match=r"vocab_size 300 vs 290; eos_ids \(2, 4\) vs \(2,\)"):
        check_compatible(tok, other)


def test_generation_config_replaces_ids_and_keeps_settings(tok):
    base = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": 7, "bos_token_id": 9,
            "pad_token_id": 8}
    assert generation_config(tok, base) == {"temperature": 0.6, "top_p": 0.9,
                                            "bos_token_id": 1, "eos_token_id": [2, 4],
                                            "pad_token_id": 0}
    one = dataclasses.replace(tok, eos_ids=(2,), bos_id=None)
    assert generation_config(one, base) == {"temperature": 0.6, "top_p": 0.9,
                                            "eos_token_id": 2, "pad_token_id": 0}
    assert generation_config(one) == {"eos_token_id": 2, "pad_token_id": 0}


def test_save_updates_generation_config_ids_in_place(tmp_path, tok):
    d = tmp_path / "t"
    d.mkdir()
    (d / "generation_config.json").write_text(json.dumps(
        {"top_k": 20, "eos_token_id": 99, "bos_token_id": 98}))
    one = dataclasses.replace(tok, eos_ids=(2,), bos_id=None)
    one.save(d)
    assert json.loads((d / "generation_config.json").read_text()) == {
        "top_k": 20, "eos_token_id": 2, "pad_token_id": 0}
    assert Tokenizer.load(d) == one
    tok.save(tmp_path / "fresh")  # two EOS ids: the file is written even when absent
    assert json.loads((tmp_path / "fresh" / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": [2, 4], "pad_token_id": 0}
    assert Tokenizer.load(tmp_path / "fresh") == tok
