"""Encoding datasets to ids (RELIABILITY: a prompt too long for the configured lengths, a row
whose supervised tokens are all truncated, a dataset that filters down to nothing -> an error
that names file:line and field and states the sizes and the limits)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_jax.data import (
    CHATML_TEMPLATE,
    DataError,
    Dataset,
    Encoded,
    encode_preference,
    encode_prompts,
    encode_sft,
    load_jsonl,
    train_bpe_tokenizer,
)

CORPUS = [f"the cat sat on mat number {i} and the dog ran to park {i % 7} hello world"
          for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def _file(tmp_path, rows, fmt, name="d.jsonl", blank_lines=0):
    path = tmp_path / name
    path.write_text("\n" * blank_lines + "".join(json.dumps(r) + "\n" for r in rows))
    return load_jsonl(path, fmt=fmt)


def _convo(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# ---------------------------------------------------------------------------- SFT
def test_encode_sft_prompt_completion_hand(tok, tmp_path):
    ds = _file(tmp_path, [{"prompt": "the cat", "completion": " sat on mat"}], "prompt_completion")
    p, c = tok.encode("the cat"), tok.encode(" sat on mat")
    assert tok.bos_id == 1 and tok.eos_ids[0] == 2
    out = encode_sft(ds, tok, max_length=64)
    assert isinstance(out, Encoded) and out.skipped == 0
    assert out.items == [([1, *p, *c, 2], [0] * (1 + len(p)) + [1] * (len(c) + 1))]


def test_encode_sft_without_bos(tok, tmp_path):
    nobos = dataclasses.replace(tok, add_bos_token=False)
    ds = _file(tmp_path, [{"prompt": "hello", "completion": " world"}], "prompt_completion")
    p, c = tok.encode("hello"), tok.encode(" world")
    assert encode_sft(ds, nobos, max_length=64).items == [
        ([*p, *c, 2], [0] * len(p) + [1] * (len(c) + 1))]


def test_encode_sft_messages_hand(tok, tmp_path):
    convo = _convo(("system", "be brief"), ("user", "hello"), ("assistant", "world"))
    ds = _file(tmp_path, [convo], "messages")
    ids, mask = tok.encode_chat(convo["messages"])
    (got_ids, got_mask), = encode_sft(ds, tok, max_length=128).items
    assert got_ids == [1, *ids] and got_mask == [0, *mask]
    assert tok.decode([i for i, m in zip(got_ids, got_mask) if m],
                      skip_special_tokens=False) == "world<|im_end|>"


def test_encode_sft_messages_no_second_bos_when_template_writes_it(tok, tmp_path):
    bos_tok = dataclasses.replace(tok, chat_template="{{ bos_token }}" + CHATML_TEMPLATE)
    convo = _convo(("user", "hello"), ("assistant", "world"))
    ds = _file(tmp_path, [convo], "messages")
    (ids, mask), = encode_sft(ds, bos_tok, max_length=128).items
    assert ids[:2] != [1, 1] and ids[0] == 1
    assert (ids, mask) == tuple(bos_tok.encode_chat(convo["messages"]))


def test_encode_sft_overflow_error_names_file_line_field_length_limit(tok, tmp_path):
    rows = [{"prompt": "hi", "completion": "x"}, {"prompt": "the cat " * 10, "completion": "x"}]
    ds = _file(tmp_path, rows, "prompt_completion", name="sft.jsonl", blank_lines=2)
    n = 1 + len(tok.encode("the cat " * 10)) + len(tok.encode("x")) + 1
    with pytest.raises(DataError) as info:
        encode_sft(ds, tok, max_length=12)
    assert str(info.value) == (
        f"{ds.path}:4: field 'completion': the sequence is {n} tokens, longer than "
        "max_length=12; raise max_length or pass on_overflow='truncate' or 'skip'")


def test_encode_sft_messages_overflow_names_messages(tok, tmp_path):
    ds = _file(tmp_path, [_convo(("user", "the cat " * 10), ("assistant", "x"))], "messages")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'messages': the sequence is \d+ "
                                        r"tokens, longer than max_length=16"):
        encode_sft(ds, tok, max_length=16)


def test_encode_sft_truncate_keeps_the_prefix(tok, tmp_path):
    rows = [{"prompt": "hi", "completion": " the cat sat on mat " * 3}]
    ds = _file(tmp_path, rows, "prompt_completion")
    (full_ids, full_mask), = encode_sft(ds, tok, max_length=200).items
    out = encode_sft(ds, tok, max_length=8, on_overflow="truncate")
    assert out.items == [(full_ids[:8], full_mask[:8])] and out.skipped == 0


def test_encode_sft_truncate_error_when_no_target_remains(tok, tmp_path):
    rows = [{"prompt": "short", "completion": "x"},
            {"prompt": "the cat sat on mat " * 3, "completion": "x"}]
    ds = _file(tmp_path, rows, "prompt_completion", name="t.jsonl")
    first = 1 + len(tok.encode(rows[1]["prompt"])) + 1  # 1-based index of the first target
    with pytest.raises(DataError) as info:
        encode_sft(ds, tok, max_length=6, on_overflow="truncate")
    msg = str(info.value)
    assert msg.startswith(f"{ds.path}:2: field 'completion': all supervised tokens "
                          f"truncated")
    assert f"first target is token {first}, beyond max_length=6" in msg


def test_encode_sft_skip_counts_and_all_skipped_errors(tok, tmp_path):
    rows = [{"prompt": "hi", "completion": "x"}, {"prompt": "the cat " * 10, "completion": "x"},
            {"prompt": "hello", "completion": "y"}]
    ds = _file(tmp_path, rows, "prompt_completion")
    out = encode_sft(ds, tok, max_length=10, on_overflow="skip")
    assert out.skipped == 1
    assert out.items == [encode_sft(Dataset.from_rows([r], fmt="prompt_completion"), tok,
                                    max_length=10).items[0] for r in (rows[0], rows[2])]
    with pytest.raises(DataError) as info:
        encode_sft(ds, tok, max_length=3, on_overflow="skip")
    assert str(info.value) == (f"{ds.path}: no rows left: all 3 rows are longer than "
                               "max_length=3 (on_overflow='skip')")


def test_encode_sft_argument_checks(tok, tmp_path):
    ds = _file(tmp_path, [{"prompt": "a", "chosen": "b", "rejected": "c"}], "preference")
    with pytest.raises(ValueError, match="encode_sft needs a dataset of format 'text' or "
                                         "'prompt_completion' or 'messages'"):
        encode_sft(ds, tok, max_length=8)
    pc = Dataset.from_rows([{"prompt": "a", "completion": "b"}], fmt="prompt_completion")
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        encode_sft(pc, tok, max_length=8, on_overflow="drop")
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        encode_sft(pc, tok, max_length=0)


# ---------------------------------------------------------------------------- preference
def test_encode_preference_hand(tok, tmp_path):
    ds = _file(tmp_path, [{"prompt": "hello", "chosen": " world", "rejected": " dog"}],
               "preference")
    out = encode_preference(ds, tok, max_prompt_length=8, max_length=16)
    assert out == Encoded([([1, *tok.encode("hello")], [*tok.encode(" world"), 2],
                            [*tok.encode(" dog"), 2])], 0)


def test_encode_preference_prompt_too_long(tok, tmp_path):
    rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"},
            {"prompt": "the cat sat on the mat", "chosen": "a", "rejected": "b"}]
    ds = _file(tmp_path, rows, "preference", name="pref.jsonl")
    n = 1 + len(tok.encode(rows[1]["prompt"]))
    for mode in ("error", "truncate"):
        with pytest.raises(DataError) as info:
            encode_preference(ds, tok, max_prompt_length=4, max_length=32, on_overflow=mode)
        assert str(info.value) == (
            f"{ds.path}:2: field 'prompt': the prompt is {n} tokens (BOS "
            "included), longer than max_prompt_length=4; prompts are never truncated: raise "
            "max_prompt_length or pass on_overflow='skip'")
    out = encode_preference(ds, tok, max_prompt_length=4, max_length=32, on_overflow="skip")
    assert out.skipped == 1 and len(out.items) == 1


def test_encode_preference_response_overflow(tok, tmp_path):
    rows = [{"prompt": "hi", "chosen": "a", "rejected": " the cat sat on the mat hello world"}]
    ds = _file(tmp_path, rows, "preference")
    p = [1, *tok.encode("hi")]
    rejected = [*tok.encode(rows[0]["rejected"]), 2]
    with pytest.raises(DataError) as info:
        encode_preference(ds, tok, max_prompt_length=4, max_length=6)
    assert str(info.value).startswith(
        f"{ds.path}:1: field 'rejected': prompt + rejected is {len(p) + len(rejected)} tokens, "
        "longer than max_length=6")
    out = encode_preference(ds, tok, max_prompt_length=4, max_length=6, on_overflow="truncate")
    assert out.items == [(p, [*tok.encode("a"), 2], rejected[:6 - len(p)])]
    with pytest.raises(DataError, match="all 1 rows are longer than max_prompt_length=4 or "
                                        "max_length=6"):
        encode_preference(ds, tok, max_prompt_length=4, max_length=6, on_overflow="skip")


def test_encode_preference_needs_room_for_a_response(tok):
    ds = Dataset.from_rows([{"prompt": "a", "chosen": "b", "rejected": "c"}], fmt="preference")
    with pytest.raises(ValueError, match="max_prompt_length=8 must be < max_length=8"):
        encode_preference(ds, tok, max_prompt_length=8, max_length=8)


# ---------------------------------------------------------------------------- prompts
def test_encode_prompts_hand_and_passthrough_formats(tok, tmp_path):
    ds = _file(tmp_path, [{"prompt": "two plus", "answer": "4"}], "prompt")
    assert encode_prompts(ds, tok, max_prompt_length=16) == Encoded(
        [[1, *tok.encode("two plus")]], 0, (0,), prompts=("two plus",))
    pref = Dataset.from_rows([{"prompt": "hello", "chosen": "b", "rejected": "c"}],
                             fmt="preference")
    assert encode_prompts(pref, tok, max_prompt_length=8).items == [[1, *tok.encode("hello")]]


def test_encode_prompts_skip_keeps_row_indices(tok, tmp_path):
    # rows 0 and 2 fit in 6 tokens (BOS + a few), row 1 does not: kept == (0, 2), so a caller
    # can keep each prompt's other columns (e.g. the answer a verifier needs) aligned
    long = "word " * 20
    ds = _file(tmp_path, [{"prompt": "a", "answer": "1"}, {"prompt": long, "answer": "2"},
                          {"prompt": "b", "answer": "3"}], "prompt")
    out = encode_prompts(ds, tok, max_prompt_length=6, on_overflow="skip")
    assert out.skipped == 1 and out.kept == (0, 2)
    assert [ds.rows[i]["answer"] for i in out.kept] == ["1", "3"]
    assert out.items == [[1, *tok.encode("a")], [1, *tok.encode("b")]]


def test_encode_prompts_messages_drop_the_final_assistant_turn(tok, tmp_path):
    convo = _convo(("user", "hello"), ("assistant", "world"))
    ds = _file(tmp_path, [convo, _convo(("user", "a"), ("assistant", "b"), ("user", "cat"))],
               "messages")
    out = encode_prompts(ds, tok, max_prompt_length=64)
    gen = tok.encode_chat(convo["messages"][:1], add_generation_prompt=True)[0]
    assert out.items[0] == [1, *gen]
    assert tok.decode(out.items[0], skip_special_tokens=False) == (
        "<|bos|><|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(out.items[1], skip_special_tokens=False).endswith(
        "<|im_start|>user\ncat<|im_end|>\n<|im_start|>assistant\n")


def test_encode_prompts_errors(tok, tmp_path):
    ds = _file(tmp_path, [_convo(("assistant", "only me"))], "messages", name="m.jsonl")
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'messages': no prompt: the "
                                        r"conversation holds assistant messages only"):
        encode_prompts(ds, tok, max_prompt_length=64)
    rows = [{"prompt": "the cat sat on the mat"}, {"prompt": "hi"}]
    ds = _file(tmp_path, rows, "prompt", name="p.jsonl", blank_lines=1)
    n = 1 + len(tok.encode(rows[0]["prompt"]))
    with pytest.raises(DataError, match=rf"p\.jsonl:2: field 'prompt': the prompt is {n} tokens "
                                        r".*max_prompt_length=3"):
        encode_prompts(ds, tok, max_prompt_length=3, on_overflow="truncate")
    out = encode_prompts(ds, tok, max_prompt_length=3, on_overflow="skip")
    assert out == Encoded([[1, *tok.encode("hi")]], 1, (1,), prompts=("hi",))
    with pytest.raises(DataError, match=r"no rows left: all 2 rows are longer than "
                                        r"max_prompt_length=1"):
        encode_prompts(ds, tok, max_prompt_length=1, on_overflow="skip")
