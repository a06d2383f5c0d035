"""Tests of the verifiable arithmetic task (experiments/tasks/arithmetic.py)."""

from __future__ import annotations

import json
import operator
import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.tasks import arithmetic as ar
from rlhf_jax.rewards import exact_match, exact_match_reward

PROMPT_RE = re.compile(r"What is (\d+)([-+*])(\d+)\? Answer:")
INT_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _solve(prompt: str) -> int:
    m = PROMPT_RE.fullmatch(prompt)
    assert m, prompt
    return INT_OPS[m.group(2)](int(m.group(1)), int(m.group(3)))


def _rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text("utf-8").splitlines()]


def test_make_problems_hand_format():
    assert ar._problem(23, "+", 17) == {"prompt": "What is 23+17? Answer:", "answer": "40"}
    assert ar._problem(12, "-", 40) == {"prompt": "What is 12-40? Answer:", "answer": "-28"}
    assert ar._problem(7, "*", 6) == {"prompt": "What is 7*6? Answer:", "answer": "42"}


@given(st.integers(0, 10**6), st.integers(1, 200), st.sampled_from(["+", "-", "*", "+-", "+-*"]))
def test_make_problems_property_answers_are_correct(seed, max_operand, ops):
    rows = ar.make_problems(seed, 30, max_operand=max_operand, ops=ops)
    assert rows == ar.make_problems(seed, 30, max_operand=max_operand, ops=ops)
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        assert int(row["answer"]) == _solve(row["prompt"])
        assert row["answer"] == str(int(row["answer"]))  # canonical decimal, no "+", no "-0"
        a, op, b = PROMPT_RE.fullmatch(row["prompt"]).groups()
        assert op in ops and 0 <= int(a) <= max_operand and 0 <= int(b) <= max_operand


def test_make_problems_uses_every_operator_and_checks_arguments():
    rows = ar.make_problems(0, 300, ops="+-*")
    assert {PROMPT_RE.fullmatch(r["prompt"]).group(2) for r in rows} == {"+", "-", "*"}
    for bad in ("", "/", "+x"):
        with pytest.raises(ValueError):
            ar.make_problems(0, 1, ops=bad)
    with pytest.raises(ValueError):
        ar.make_problems(0, 1, max_operand=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return ar.write_datasets(str(tmp_path_factory.mktemp("ar")))


def test_write_datasets_sft_has_exactly_the_wrong_fraction(files):
    sft = _rows(files["paths"]["sft"])
    assert len(sft) == 2000
    wrong = 0
    for row in sft:
        assert set(row) == {"prompt", "answer", "completion"}
        assert int(row["answer"]) == _solve(row["prompt"])
        assert re.fullmatch(r" -?\d+", row["completion"]), row
        off = int(row["completion"]) - int(row["answer"])
        assert off in (0, -3, -2, -1, 1, 2, 3)
        wrong += off != 0
    assert wrong == 600 and files["stats"]["sft_wrong_fraction"] == pytest.approx(0.3)
    # the verifier agrees: 70% of SFT completions are right
    rewards = exact_match_reward([r["prompt"] for r in sft], [r["completion"] for r in sft],
                                 answer=[r["answer"] for r in sft])
    assert sum(rewards) == 1400


def test_write_datasets_eval_is_distinct_and_held_out(files):
    paths = files["paths"]
    evals, train, sft = (_rows(paths[k]) for k in ("eval_prompts", "train_prompts", "sft"))
    assert len(evals) == 256 and len(train) == 2000
    eval_prompts = [r["prompt"] for r in evals]
    assert len(set(eval_prompts)) == 256
    assert not set(eval_prompts) & {r["prompt"] for r in train + sft}
    for row in evals + train:
        assert set(row) == {"prompt", "answer"}
        assert int(row["answer"]) == _solve(row["prompt"])
        assert exact_match(f" {row['answer']}", row["answer"]) == 1.0


def test_write_datasets_is_deterministic_and_checks_sizes(tmp_path):
    kw = dict(n_sft=50, n_train=40, n_eval=30)
    a = ar.write_datasets(str(tmp_path / "a"), seed=3, **kw)["paths"]
    b = ar.write_datasets(str(tmp_path / "b"), seed=3, **kw)["paths"]
    c = ar.write_datasets(str(tmp_path / "c"), seed=4, **kw)["paths"]
    for name in a:
        assert pathlib.Path(a[name]).read_bytes() == pathlib.Path(b[name]).read_bytes(), name
        assert pathlib.Path(a[name]).read_bytes() != pathlib.Path(c[name]).read_bytes(), name
    with pytest.raises(ValueError, match="more than half"):
        ar.write_datasets(str(tmp_path / "d"), n_eval=10, max_operand=2, ops="+")  # 9 exist
    with pytest.raises(ValueError):
        ar.write_datasets(str(tmp_path / "e"), wrong_fraction=1.5)


def test_corpus_covers_digits_and_format():
    texts = ar.corpus(0)
    assert texts == ar.corpus(0)
    joined = "".join(texts)
    assert set("0123456789+-?:") <= set(joined) and "What is" in joined and "Answer:" in joined
    full = [t for t in texts if PROMPT_RE.match(t)]
    assert len(full) == 4000
    for t in full[:200]:
        prompt, answer = t.rsplit(" ", 1)
        assert int(answer) == _solve(prompt)
