"""Every stage's loader on every TRL data format (standard and conversational): the formats a
stage reads load, in JSONL and in Parquet alike, and the others are refused with the formats it
reads, before anything is built. Each stage's full run from the command line:
tests/test_cli.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax.data import Tokenizer
from rlhf_jax.pipelines.config import DataConfig
from rlhf_jax.pipelines.datasets import (PAIR_FORMATS, PROMPT_FORMATS, SFT_FORMATS, load_pairs,
                                         load_prompts, load_sft_batch)

LOADERS = {"sft / distill": (load_sft_batch, SFT_FORMATS),
           "reward-model / dpo": (load_pairs, PAIR_FORMATS),
           "ppo / grpo / best-of-n": (load_prompts, PROMPT_FORMATS)}
FILES = {"text": "text", "prompt_completion": "prompt_completion",
         "prompt_completion_chat": "prompt_completion", "messages": "messages",
         "prompt": "prompt", "prompt_chat": "prompt", "preference": "preference",
         "preference_chat": "preference", "preference_implicit": "preference",
         "preference_implicit_chat": "preference",
         "unpaired_preference_chat": "unpaired_preference"}


@pytest.fixture(scope="module")
def tok(chat_world):
    return Tokenizer.load(chat_world["ckpt"])


@pytest.mark.filterwarnings("ignore:.*plain strings:UserWarning")
@pytest.mark.parametrize("stage", sorted(LOADERS))
@pytest.mark.parametrize("name", sorted(FILES))
def test_stage_by_format(chat_world, tok, stage, name):
    load, formats = LOADERS[stage]
    path = chat_world[name]
    data = DataConfig(train=path, max_prompt_length=32, max_length=64, batch_size=4)
    if FILES[name] not in formats:
        with pytest.raises(ValueError, match=rf"reads the formats {list(formats)!r}".replace(
                "[", r"\[").replace("]", r"\]")):
            load(path, data, tok)
        return
    out = load(path, data, tok)
    batch = out[0] if stage.startswith("ppo") else out
    tokens = np.asarray(batch.chosen.tokens if hasattr(batch, "chosen") else batch.tokens)
    assert tokens.shape[0] == len(open(path).read().splitlines())
    if stage.startswith("ppo") and (name.endswith("_chat") or name == "messages"):
        header = tok.encode_structure("<|im_start|>assistant\n")
        assert (tokens[:, -len(header):] == np.asarray(header)).all()


def test_a_chat_tokenizer_warns_once_about_plain_strings(chat_world, tok):
    path = chat_world["prompt"]
    with pytest.warns(UserWarning, match="plain strings, so they reach the model as raw text"):
        load_prompts(path, DataConfig(train=path, max_prompt_length=32), tok)


def test_parquet_loads_like_jsonl(chat_world, tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = chat_world["preference_implicit_chat"]
    rows = [json.loads(x) for x in open(src)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    data = DataConfig(train=src, max_prompt_length=32, max_length=64)
    a = load_pairs(src, data, tok)
    b = load_pairs(str(tmp_path / "p.parquet"), data, tok)
    for x, y in zip(a.chosen, b.chosen):
        np.testing.assert_array_equal(x, y)
