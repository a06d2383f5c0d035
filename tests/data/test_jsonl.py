"""JSONL reading and writing (RELIABILITY: bad input gets a clear error naming file, line and
field, at load time; with ``skip_invalid`` the row is skipped and counted)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.data import FORMATS, DataError, Dataset, detect_format, load_jsonl, write_jsonl


def _write_bytes(tmp_path, data: bytes, name: str = "train.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _lines(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD_PC = {"prompt": "Hi", "completion": "there"}


def test_formats_table_is_exactly_trls_formats():
    assert list(FORMATS) == ["text", "messages", "prompt", "prompt_completion", "preference",
                             "unpaired_preference"]


def test_load_jsonl_rows_lines_and_extra_fields(tmp_path):
    rows = [{"prompt": "2+2?", "answer": "4", "meta": {"id": 7}},
            {"prompt": "héllo 日本 \u2028 sep", "answer": None}]
    data = b"\n" + _lines(rows[0]) + b"   \n\r\n" + _lines(rows[1])
    path = _write_bytes(tmp_path, data)
    ds = load_jsonl(path, fmt="prompt")
    assert ds == Dataset(path=path, fmt="prompt", rows=tuple(rows), skipped=0,
                         skipped_reasons=(), lines=(2, 5))
    assert len(ds) == 2 and ds.line(1) == 5


def test_load_jsonl_strips_a_utf8_byte_order_mark(tmp_path):
    path = _write_bytes(tmp_path, b"\xef\xbb\xbf" + _lines(GOOD_PC))
    assert load_jsonl(path, fmt="prompt_completion").rows == (GOOD_PC,)


def test_line_separator_characters_inside_strings_do_not_split_rows(tmp_path):
    rows = [{"prompt": "a\u2028b\u0085c\u2029d\x1c", "completion": "x\ry"}]
    path = str(tmp_path / "w.jsonl")
    write_jsonl(path, rows)
    assert load_jsonl(path, fmt="prompt_completion").rows == tuple(rows)


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# (file bytes, fmt, line, field, extra substrings)
ERROR_CASES = {
    "invalid_utf8": (_lines(GOOD_PC) + b'{"prompt": "caf\xe9", "completion": "x"}\n',
                     "prompt_completion", 2, None, ["invalid UTF-8"]),
    "malformed_json": (_lines(GOOD_PC, GOOD_PC) + b'{"prompt": "a", "completion": }\n',
                       "prompt_completion", 3, None, ["malformed JSON", "Expecting value"]),
    "not_an_object": (_lines(GOOD_PC, ["prompt", "x"]), "prompt_completion", 2, None,
                      ["expected a JSON object, got list"]),
    "missing_field": (_lines({"prompt": "a"}), "prompt_completion", 1, "completion",
                      ["missing", "['prompt']"]),
    "wrong_type": (_lines({"prompt": "a", "chosen": 3, "rejected": "b"}), "preference", 1,
                   "chosen", ["expected a non-empty string or a list of messages, got int"]),
    "null_field": (_lines({"prompt": "a", "chosen": "c", "rejected": "d"},
                          {"prompt": "a", "chosen": "c", "rejected": None}),
                   "preference", 2, "rejected", ["got null"]),
    "empty_prompt": (_lines({"prompt": ""}), "prompt", 1, "prompt",
                     ["expected a non-empty string, got an empty string"]),
    "messages_not_list": (_lines({"messages": "hi"}), "messages", 1, "messages",
                          ["expected a list of messages, got str"]),
    "message_not_object": (_lines({"messages": ["hi"]}), "messages", 1, "messages[0]",
                           ["got str"]),
    "bad_role": (_lines(_msgs(("user", "a"), ("robot", "b"))), "messages", 1, "messages[1].role",
                 ["'robot'", "'assistant'"]),
    "missing_content": (_lines({"messages": [{"role": "user"}]}), "messages", 1,
                        "messages[0].content", ["missing"]),
    "content_type": (_lines({"messages": [{"role": "user", "content": "a"},
                                           {"role": "assistant", "content": 4}]}),
                     "messages", 1, "messages[1].content", ["got int"]),
    "empty_assistant": (_lines(_msgs(("user", "a"), ("assistant", ""))), "messages", 1,
                        "messages[1].content", ["empty string"]),
    "mixed_kinds": (_lines({"prompt": [{"role": "user", "content": "a"}], "completion": "b"}),
                    "prompt_completion", 1, "completion", ["mixes strings (['completion'])"]),
    "prompt_ends_with_assistant": (
        _lines({"prompt": [{"role": "user", "content": "a"},
                           {"role": "assistant", "content": "b"}]}), "prompt", 1, "prompt",
        ["must end with a user, system or tool message"]),
    "completion_not_assistant": (
        _lines({"prompt": [{"role": "user", "content": "a"}],
                "completion": [{"role": "user", "content": "b"}]}), "prompt_completion", 1,
        "completion[0].role", ["assistant messages only"]),
    "label_not_bool": (_lines({"prompt": "a", "completion": "b", "label": 1}),
                       "unpaired_preference", 1, "label", ["expected true or false, got int"]),
    "implicit_no_prefix": (_lines({"chosen": "abc", "rejected": "xyz"}), "preference", 1,
                           "chosen", ["share no prompt prefix"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_load_jsonl_errors_name_file_line_and_field(tmp_path, case):
    data, fmt, line, field, extra = ERROR_CASES[case]
    path = _write_bytes(tmp_path, data, name=f"{case}.jsonl")
    with pytest.raises(DataError) as info:
        load_jsonl(path, fmt=fmt)
    msg = str(info.value)
    prefix = f"{path}:{line}: " + (f"field {field!r}: " if field else "")
    assert msg.startswith(prefix), msg
    for s in extra:
        assert s in msg, msg


def test_load_jsonl_exact_message_for_wrong_type(tmp_path):
    path = _write_bytes(tmp_path, _lines(GOOD_PC) * 16 + _lines({"prompt": "p", "chosen": 1,
                                                                  "rejected": "r"}))
    path_pref = _write_bytes(tmp_path, b"\n" * 16 + _lines({"prompt": "p", "chosen": 1,
                                                             "rejected": "r"}), "p.jsonl")
    with pytest.raises(DataError) as info:
        load_jsonl(path_pref, fmt="preference")
    assert str(info.value) == (
        f"{path_pref}:17: field 'chosen': expected a non-empty string or a list of messages, "
        "got int")
    with pytest.raises(DataError, match=r":17: field 'completion': missing"):
        load_jsonl(path, fmt="prompt_completion")


def test_skip_invalid_counts_and_keeps_good_rows(tmp_path):
    data = (_lines(GOOD_PC) + b"{oops\n" + b"\xff\xfe\n"
            + _lines({"prompt": "x"}, [1], {"prompt": "b", "completion": "c"}))
    path = _write_bytes(tmp_path, data)
    ds = load_jsonl(path, fmt="prompt_completion", skip_invalid=True)
    assert ds.rows == (GOOD_PC, {"prompt": "b", "completion": "c"})
    assert ds.lines == (1, 6)
    assert ds.skipped == 4
    assert [r.split(": ")[0] for r in ds.skipped_reasons] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert "field 'completion': missing" in ds.skipped_reasons[2]


def test_skipped_reasons_keep_only_the_first_five(tmp_path):
    path = _write_bytes(tmp_path, _lines(*([{"prompt": 1}] * 7), GOOD_PC))
    ds = load_jsonl(path, fmt="prompt", skip_invalid=True)
    assert ds.skipped == 7 and len(ds.skipped_reasons) == 5
    assert ds.skipped_reasons[4].startswith(f"{path}:5: field 'prompt'")


def test_everything_skipped_is_an_error_with_the_count(tmp_path):
    path = _write_bytes(tmp_path, _lines({"prompt": 1}, {"q": "a"}, {"prompt": ""}))
    with pytest.raises(DataError) as info:
        load_jsonl(path, fmt="prompt", skip_invalid=True)
    msg = str(info.value)
    assert msg.startswith(f"{path}: no valid 'prompt' rows: all 3 rows were skipped")
    assert f"{path}:1: field 'prompt'" in msg


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, data):
    path = _write_bytes(tmp_path, data)
    with pytest.raises(DataError, match="no rows: the dataset is empty"):
        load_jsonl(path, fmt="prompt", skip_invalid=True)


def test_unknown_format_lists_the_formats(tmp_path):
    path = _write_bytes(tmp_path, _lines(GOOD_PC))
    with pytest.raises(ValueError) as info:
        load_jsonl(path, fmt="chat")
    assert not isinstance(info.value, DataError)
    assert str(info.value) == ("unknown dataset format 'chat'; expected 'auto' or one of "
                               "['text', 'messages', 'prompt', 'prompt_completion', "
                               "'preference', 'unpaired_preference']")


def test_from_rows_validates_like_load_jsonl():
    with pytest.raises(DataError, match=r"^<memory>:2: field 'rejected': missing"):
        Dataset.from_rows([{"prompt": "a", "chosen": "b", "rejected": "c"},
                           {"prompt": "a", "chosen": "b"}], fmt="preference")
    ds = Dataset.from_rows([{"prompt": "a"}, {"prompt": 3}, {"prompt": "b"}], fmt="prompt",
                           skip_invalid=True)
    assert ds.rows == ({"prompt": "a"}, {"prompt": "b"}) and ds.lines == (1, 3)
    assert ds.skipped == 1


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [], "prompt": "x", "chosen": "a", "rejected": "b"}, "messages"),
    ({"prompt": "x", "chosen": "a", "rejected": "b", "completion": "c"}, "preference"),
    ({"prompt": "x", "chosen": "a"}, "prompt"),
    ({"prompt": "x", "completion": "c"}, "prompt_completion"),
    ({"prompt": "x", "answer": "4"}, "prompt"),
    ({"text": "x"}, "text"),
    ({"chosen": "a", "rejected": "b"}, "preference"),
    ({"prompt": "x", "completion": "c", "label": True}, "unpaired_preference"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_write_jsonl_exact_bytes(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": "é日", "b": [1, 2.5, None]}, {"c": True}])
    assert path.read_bytes() == ('{"a": "é日", "b": [1, 2.5, null]}\n{"c": true}\n').encode()
    assert os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("bad", [["not a dict"], [{"x": float("nan")}]])
def test_write_jsonl_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, bad):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"old": 1}])
    with pytest.raises((TypeError, ValueError)):
        write_jsonl(path, [{"new": 1}, *bad])
    assert path.read_text() == '{"old": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


_text = st.text(min_size=1, max_size=12)


@given(st.lists(st.fixed_dictionaries({"prompt": _text, "chosen": _text, "rejected": _text},
                                      optional={"extra": st.integers() | _text}),
                min_size=1, max_size=6))
def test_write_then_load_round_trips_property(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("rt") / "rows.jsonl"
    write_jsonl(path, rows)
    ds = load_jsonl(path, fmt="preference")
    assert ds.rows == tuple(rows)
    assert ds.lines == tuple(range(1, len(rows) + 1))
