"""TRL's dataset formats, standard and conversational, from JSONL, Parquet and ``datasets``
directories, encoded with the chat template (RELIABILITY: a row of the wrong shape is an error
naming file:line and field; conversational data always goes through the template, and the
prompt/response boundary is the template's own)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_jax.data import (DataError, Dataset, detect_format, encode_preference, encode_prompts,
                           encode_sft, encode_unpaired, extract_prompt, load_dataset,
                           train_bpe_tokenizer)
from rlhf_jax.data.encode import chat_pair
from rlhf_jax.data.formats import RowError
from tests.data.test_tokenizer import CORPUS, LLAMA3_SPECIALS, LLAMA3_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def llama():
    t = train_bpe_tokenizer(CORPUS, vocab_size=400, special_tokens=LLAMA3_SPECIALS,
                            bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            pad_token=None, chat_template=LLAMA3_TEMPLATE)
    # as a Llama-3 checkpoint's generation_config.json says: <|eot_id|> ends a turn
    return dataclasses.replace(t, eos_ids=(*t.eos_ids, t.token_to_id("<|eot_id|>")))


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# One good row per (format, kind); each is detected as its format and validates.
GOOD = {
    ("text", "standard"): {"text": "The sky is blue."},
    ("messages", "conversational"): {"messages": user("What color is the sky?")
                                     + assistant("It is blue.")},
    ("prompt", "standard"): {"prompt": "The sky is"},
    ("prompt", "conversational"): {"prompt": user("What color is the sky?")},
    ("prompt_completion", "standard"): {"prompt": "The sky is", "completion": " blue."},
    ("prompt_completion", "conversational"): {"prompt": user("What color is the sky?"),
                                              "completion": assistant("It is blue.")},
    ("preference", "standard"): {"prompt": "The sky is", "chosen": " blue.",
                                 "rejected": " green."},
    ("preference", "conversational"): {"prompt": user("What color is the sky?"),
                                       "chosen": assistant("It is blue."),
                                       "rejected": assistant("It is green.")},
    ("preference", "standard implicit"): {"chosen": "The sky is blue.",
                                          "rejected": "The sky is green."},
    ("preference", "conversational implicit"): {
        "chosen": user("What color is the sky?") + assistant("It is blue."),
        "rejected": user("What color is the sky?") + assistant("It is green.")},
    ("unpaired_preference", "standard"): {"prompt": "The sky is", "completion": " blue.",
                                          "label": True},
    ("unpaired_preference", "conversational"): {"prompt": user("What color is the sky?"),
                                                "completion": assistant("It is green."),
                                                "label": False},
}


@pytest.mark.parametrize("fmt, kind", sorted(GOOD))
def test_every_trl_format_is_detected_and_validates(fmt, kind):
    row = GOOD[fmt, kind]
    assert detect_format(row) == fmt
    ds = Dataset.from_rows([row, row])
    assert ds.fmt == fmt and ds.conversational == kind.startswith("conversational")


def test_a_typo_in_the_first_row_names_line_and_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"promt": "hi", "completion": "x"}\n')
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert str(info.value) == (f"{path}:2: field 'prompt': missing (the row has fields "
                               "['completion', 'promt'])")
    path.write_text('{"promt": "hi"}\n')
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert str(info.value).startswith(f"{path}:1: the row's fields ['promt'] match no dataset "
                                      "format (field sets: messages; chosen+rejected;")
    with pytest.raises(RowError):
        detect_format({"question": "a"})


def test_rows_of_one_file_keep_one_kind():
    rows = [GOOD["prompt", "standard"], GOOD["prompt", "conversational"]]
    with pytest.raises(DataError, match=r"<memory>:2: field 'prompt': mixes conversations and "
                                        r"strings: line 1 has a string"):
        Dataset.from_rows(rows)


def test_extract_prompt_strings_and_conversations():
    assert extract_prompt("The sky is blue.", "The sky is green.") == (
        "The sky is", " blue.", " green.")
    assert extract_prompt("ab", "ac") == ("a", "b", "c")
    conv = GOOD["preference", "conversational implicit"]
    assert extract_prompt(conv["chosen"], conv["rejected"]) == (
        user("What color is the sky?"), assistant("It is blue."), assistant("It is green."))
    for a, b, what in [("same", "same", "prefix"), ("abc", "abcd", "prefix"),
                       ("x", "y", "share no prompt prefix")]:
        with pytest.raises(RowError, match=what):
            extract_prompt(a, b)
    with pytest.raises(RowError, match="assistant messages only"):
        extract_prompt(user("a") + user("b"), user("a") + assistant("c"))


# ---------------------------------------------------------------------------- encoding
def test_text_rows_are_language_modelling(tok):
    ds = Dataset.from_rows([GOOD["text", "standard"]])
    (ids, mask), = encode_sft(ds, tok, max_length=64).items
    body = tok.encode("The sky is blue.")
    assert ids == [tok.bos_id, *body, tok.eos_ids[0]] and mask == [0] + [1] * (len(body) + 1)


def test_conversational_prompt_completion_is_templated_with_the_completion_as_target(tok):
    ds = Dataset.from_rows([GOOD["prompt_completion", "conversational"]])
    (ids, mask), = encode_sft(ds, tok, max_length=64).items
    target = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert target == "It is blue.<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|bos|><|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
        "It is blue.<|im_end|>")


@pytest.mark.parametrize("which", ["tok", "llama"])
def test_preference_explicit_and_implicit_conversations_encode_alike(which, request):
    t = request.getfixturevalue(which)
    explicit = encode_preference(Dataset.from_rows([GOOD["preference", "conversational"]]), t,
                                 max_prompt_length=48, max_length=80)
    implicit = encode_preference(
        Dataset.from_rows([GOOD["preference", "conversational implicit"]]), t,
        max_prompt_length=48, max_length=80)
    assert explicit == implicit
    (prompt, chosen, rejected), = explicit.items
    header = {"tok": "<|im_start|>assistant\n",
              "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n"}[which]
    end = {"tok": "<|im_end|>", "llama": "<|eot_id|>"}[which]
    assert t.decode(prompt, skip_special_tokens=False).endswith(header)
    assert t.decode(chosen, skip_special_tokens=False) == f"It is blue.{end}"
    assert t.decode(rejected, skip_special_tokens=False) == f"It is green.{end}"
    assert chosen[-1] in t.eos_ids and rejected[-1] in t.eos_ids


def test_standard_implicit_preference_splits_at_the_shared_prefix(tok):
    out = encode_preference(Dataset.from_rows([GOOD["preference", "standard implicit"]]), tok,
                            max_prompt_length=16, max_length=32)
    (prompt, chosen, rejected), = out.items
    assert prompt == [tok.bos_id, *tok.encode("The sky is")]
    assert chosen == [*tok.encode(" blue."), tok.eos_ids[0]]
    assert rejected == [*tok.encode(" green."), tok.eos_ids[0]]


def test_conversational_prompts_end_with_the_generation_prompt(tok):
    rows = [GOOD["prompt", "conversational"] | {"answer": "blue"}]
    out = encode_prompts(Dataset.from_rows(rows), tok, max_prompt_length=32)
    assert tok.decode(out.items[0], skip_special_tokens=False) == (
        "<|bos|><|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompts == (user("What color is the sky?"),)
    for fmt, kind in [("prompt_completion", "conversational"), ("preference", "conversational"),
                      ("preference", "conversational implicit"), ("messages", "conversational"),
                      ("unpaired_preference", "conversational")]:
        got = encode_prompts(Dataset.from_rows([GOOD[fmt, kind]]), tok, max_prompt_length=32)
        assert got.items == out.items, fmt


def test_unpaired_preference_keeps_the_label(tok):
    ds = Dataset.from_rows([GOOD["unpaired_preference", "conversational"],
                            GOOD["unpaired_preference", "conversational"] | {"label": True}])
    out = encode_unpaired(ds, tok, max_prompt_length=32, max_length=64)
    assert [label for _, _, label in out.items] == [False, True]
    assert tok.decode(out.items[0][1], skip_special_tokens=False) == "It is green.<|im_end|>"


def test_a_template_that_moves_the_boundary_is_an_error(tok):
    odd = dataclasses.replace(tok, chat_template=(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT>' }}{% endif %}"))
    ds = Dataset.from_rows([GOOD["prompt_completion", "conversational"]], path="odd.jsonl")
    with pytest.raises(DataError, match=r"odd\.jsonl:1: field 'completion': cannot apply the "
                                        r"chat template: the template renders the prompt "
                                        r"differently"):
        encode_sft(ds, odd, max_length=64)


def test_messages_without_an_assistant_turn_are_prompts_not_sft_rows(tok):
    ds = Dataset.from_rows([{"messages": user("hi")}], path="m.jsonl")
    assert len(encode_prompts(ds, tok, max_prompt_length=32).items) == 1
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'messages': no supervised tokens"):
        encode_sft(ds, tok, max_length=32)


def test_truncation_is_counted(tok):
    ds = Dataset.from_rows([{"prompt": "hi", "chosen": " the cat sat on the mat " * 3,
                             "rejected": " no"}, {"prompt": "a", "chosen": "b",
                                                  "rejected": "c"}])
    out = encode_preference(ds, tok, max_prompt_length=4, max_length=8, on_overflow="truncate")
    assert out.truncated == 1 and out.skipped == 0
    sft = Dataset.from_rows([{"prompt": "hi", "completion": " the cat sat " * 5}])
    assert encode_sft(sft, tok, max_length=6, on_overflow="truncate").truncated == 1


# ---------------------------------------------------------------------------- readers
def test_parquet_rows_nested_conversations_and_null_cells(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [GOOD["preference", "conversational"],
            {"prompt": None, **GOOD["preference", "conversational implicit"]}]
    path = tmp_path / "pref.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_dataset(path)
    assert ds.fmt == "preference" and ds.conversational and "prompt" not in ds.rows[1]
    enc = encode_preference(ds, tok, max_prompt_length=48, max_length=80)
    assert enc.items[0] == enc.items[1]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD["prompt", "standard"], {"prompt": ""}]), bad)
    with pytest.raises(DataError, match=r"bad\.parquet:2: field 'prompt': expected a non-empty"):
        load_dataset(bad)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_dataset(tmp_path / "broken.parquet")


def test_saved_datasets_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [GOOD["prompt_completion", "standard"]] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    ds = load_dataset(tmp_path / "one")
    assert ds.fmt == "prompt_completion" and list(ds.rows) == rows
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"holds the splits \['test', 'train'\], not one "
                                        r"dataset; point at one of them"):
        load_dataset(tmp_path / "dict")
    assert len(load_dataset(tmp_path / "dict" / "train")) == 3


def test_paths_that_are_no_dataset(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="is a directory but not a dataset saved with"):
        load_dataset(tmp_path)


def test_jsonl_and_parquet_load_the_same_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [GOOD["prompt_completion", "conversational"]] * 2
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_dataset(tmp_path / "d.jsonl").rows == load_dataset(tmp_path / "d.parquet").rows


# ---------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("which", ["tok", "llama"])
def test_ids_equal_transformers_apply_chat_template(which, request, tmp_path):
    """Our prompt ids and prompt + response ids equal ``apply_chat_template``'s (ChatML and
    Llama-3 style templates), the response ending at the template's end-of-turn token."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    t = request.getfixturevalue(which)
    t.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = [{"role": "system", "content": "Be brief."}] + user("What is 2+2?")
    response = assistant("4")
    bare = dataclasses.replace(t, add_bos_token=False)  # HF adds no BOS the template lacks
    p_ids, r_ids = chat_pair(bare, prompt, response)

    def ids(x):  # transformers 5 returns a BatchEncoding
        return list(x["input_ids"] if hasattr(x, "keys") else x)

    assert p_ids == ids(hf.apply_chat_template(prompt, add_generation_prompt=True))
    full = ids(hf.apply_chat_template(prompt + response, add_generation_prompt=False))
    assert full[:len(p_ids) + len(r_ids)] == p_ids + r_ids
    assert full[len(p_ids) + len(r_ids):] == t.encode_structure(
        t.decode(full[len(p_ids) + len(r_ids):], skip_special_tokens=False))
