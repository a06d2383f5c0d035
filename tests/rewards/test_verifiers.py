"""Tests of the RLVR verifiers (rlhf_jax/rewards/verifiers.py): grammar, limits, injections,
time limits. Expected values are written out or built structurally, never by executing text."""

from __future__ import annotations

import doctest
import importlib
import operator
import os
import pathlib
import signal
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.rewards import (
    REWARD_FUNCTIONS,
    exact_match,
    exact_match_reward,
    parse_expression,
    parse_number,
    with_time_limit,
)

F = Fraction


# ---------------------------------------------------------------- parse_number grammar
@pytest.mark.parametrize("text, expected", [
    ("40", F(40)), (" 40", F(40)), ("\n 40 \n", F(40)), ("+40", F(40)), ("-7", F(-7)),
    ("-0", F(0)), ("007", F(7)), ("2.50", F(5, 2)), ("-0.125", F(-1, 8)), ("3/4", F(3, 4)),
    ("-6/4", F(-3, 2)), ("Answer: 40", F(40)), ("answer:40", F(40)), ("ANSWER:\t-2", F(-2)),
    ("= 12", F(12)), ("=12", F(12)), ("40.", F(40)), ("40, because", F(40)),
    ("40 apples", F(40)), ("2.50 apples", F(5, 2)), ("40\nmore text 99", F(40)),
    ("4/2.", F(2)), ("1.5/2", F(3, 2)),  # "1.5" then rest "/2": no fraction after a decimal
])
def test_parse_number_hand_accepts(text, expected):
    got = parse_number(text)
    assert got == expected and isinstance(got, Fraction)


@pytest.mark.parametrize("text", [
    "", "   ", "forty", "40abc", "40_000", "1e9", "1e999999", "0x1F", "1/0", "- 3", "--3",
    "+-3", ".5", "Answer", "Answer: ", "The answer is 40", "(40)", "\x00", "\x0040", "40\x00",
    "40\x00x", "40\x1b[0m",
    "٣", "3٣", "²", "４０", "nan", "inf", "-inf", "Answer: Answer: 4", "= = 4",
])
def test_parse_number_hand_rejects(text):
    assert parse_number(text) is None


def test_parse_number_hand_limits():
    assert parse_number("9" * 30) == F(10**30 - 1)
    assert parse_number("9" * 31) is None
    assert parse_number("1." + "0" * 28) == F(1)        # 29 digits in all
    assert parse_number("1/" + "1" * 30) is None        # 31 digits in all
    assert parse_number("9" * 10_000) is None
    # only the first 64 characters (after stripping) are read
    assert parse_number("=" + " " * 62 + "5") == F(5)   # the 5 is character 64
    assert parse_number("=" + " " * 63 + "5") is None   # the 5 is character 65
    assert parse_number(None) is None and parse_number(40) is None


# ---------------------------------------------------------------- parse_expression
@pytest.mark.parametrize("text, expected", [
    ("7", F(7)), ("1+2*3", F(7)), ("(1+2)*3", F(9)), ("2-3-4", F(-5)), ("8/4/2", F(1)),
    ("7/2", F(7, 2)), ("1.5*2", F(3)), ("0.1+0.2", F(3, 10)), ("-3", F(-3)), ("-(-3)", F(3)),
    ("--3", F(3)), ("+3", F(3)), ("2*-3", F(-6)), (" ( 1 +\t2 ) ", F(3)), ("10/4*2", F(5)),
    ("1-(2-(3-4))", F(-2)), ("2 * (3 + 4) / -7", F(-2)),
])
def test_parse_expression_hand_accepts(text, expected):
    assert parse_expression(text) == expected


@pytest.mark.parametrize("text", [
    "", " ", "()", "1+", "+", "1 2", "(1", "1)", "2**3", "2^3", "1e5", "abc", "1/0",
    "1/(2-2)", "5/(0.0)", "x", "1+x", "[1]", "1,5", ".5", "1.", "٣", "1\n+2", "\x00",
    "__import__('os')", "1 // 2", "1 % 2",
])
def test_parse_expression_hand_rejects(text):
    assert parse_expression(text) is None


def test_parse_expression_hand_limits():
    nest = lambda d: "(" * d + "1" + ")" * d  # noqa: E731
    assert parse_expression(nest(16)) == 1 and parse_expression(nest(17)) is None
    assert parse_expression(nest(4), max_depth=4) == 1
    assert parse_expression(nest(5), max_depth=4) is None
    assert parse_expression("-" * 16 + "1") == 1 and parse_expression("-" * 17 + "1") is None
    assert parse_expression("1" + "+1" * 127) == 128               # 255 characters
    assert parse_expression("1" + "+1" * 128) is None              # 257 characters
    assert parse_expression("1" + "+1" * 128, max_length=300) == 129
    assert parse_expression("1" + "0" * 29) == 10**29              # 30 digits
    assert parse_expression("1" + "0" * 30) is None                # 31 digits
    big = "1" + "0" * 15
    assert parse_expression(f"{big}*{big}") == 10**30               # not above 10**30
    assert parse_expression(f"{big}*{big}*10") is None
    assert parse_expression(f"{big}*{big}*10/10") is None           # intermediates count too
    assert parse_expression(f"1/{big}/{big}") == F(1, 10**30)
    assert parse_expression(f"1/{big}/{big}/10") is None            # denominator too large
    with pytest.raises(ValueError):
        parse_expression("1", max_depth=0)
    with pytest.raises(ValueError):
        parse_expression("1", max_depth=10_000)


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _tree(leaves):
    """(text, value) pairs: fully parenthesised trees with unary minus; value by int ops."""
    def node(children):
        (ta, va), op, (tb, vb) = children
        return f"({ta} {op} {tb})", _OPS[op](va, vb)
    return st.recursive(
        leaves,
        lambda sub: st.one_of(
            st.tuples(sub, st.sampled_from(sorted(_OPS)), sub).map(node),
            sub.map(lambda tv: (f"-{tv[0]}", -tv[1]))),
        max_leaves=6)


_INT_LEAF = st.integers(0, 999).map(lambda n: (str(n), n))


@given(_tree(_INT_LEAF))
def test_parse_expression_property_matches_int_arithmetic(case):
    text, value = case
    assert parse_expression(text, max_depth=100, max_length=10_000) == value


@given(st.lists(st.integers(0, 99), min_size=1, max_size=8),
       st.lists(st.sampled_from(["+", "-", "*"]), min_size=7, max_size=7))
def test_parse_expression_property_precedence_without_parentheses(nums, ops):
    ops = ops[:len(nums) - 1]
    text = "".join(f"{n}{op}" for n, op in zip(nums, ops)) + str(nums[-1])
    # expected structurally: fold products first, then add the signed terms left to right
    terms, signs = [nums[0]], [1]
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(1 if op == "+" else -1)
    assert parse_expression(text) == sum(s * t for s, t in zip(signs, terms))


@given(st.integers(-999, 999), st.integers(1, 999))
def test_parse_expression_property_division_is_exact(a, b):
    assert parse_expression(f"{a}/{b}") == F(a, b)
    assert parse_expression(f"({a})/({b})*{b}") == a


# ---------------------------------------------------------------- exact_match
@pytest.mark.parametrize("completion, answer, expected", [
    (" 40", "40", 1.0), ("Answer: 40", "40", 1.0), ("40.0", "40", 1.0), ("0.5", "1/2", 1.0),
    ("-0", "0", 1.0), ("41", "40", 0.0), ("40abc", "40", 0.0), ("", "40", 0.0),
    ("40", "", 0.0), ("40", "forty", 0.0), ("٣", "3", 0.0), ("The answer is 40", "40", 0.0),
])
def test_exact_match_hand(completion, answer, expected):
    assert exact_match(completion, answer) == expected


@given(st.integers(-(10**29), 10**29))
def test_exact_match_property_integers(n):
    assert exact_match(str(n), str(n)) == 1.0
    assert exact_match(f" Answer: {n}\n", str(n)) == 1.0
    assert exact_match(str(n + 1), str(n)) == 0.0


def test_exact_match_reward_hand():
    prompts = ["What is 1+1? Answer:"] * 4
    completions = [" 2", " 3", [{"role": "assistant", "content": "2"}], None]
    got = exact_match_reward(prompts, completions, answer=["2"] * 4, topic=["a"] * 4)
    assert got == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="answers"):
        exact_match_reward(prompts, completions, answer=["2"])
    assert REWARD_FUNCTIONS == {"exact_match": exact_match_reward}


# ---------------------------------------------------------------- injection payloads
PAYLOADS = [
    "__import__('os').system('touch /tmp/pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "(" * 10_000 + "1" + ")" * 10_000,
    "9" * 10_000,
    "1e999999",
    "1/0",
    "\x00",
    "٣",
    "Answer: __import__('os').system('touch /tmp/pwned')",
    "= (lambda: 1)()",
    "{{ 7*7 }}",
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_injection_payloads_score_zero_without_side_effects(payload, tmp_path):
    pwned = pathlib.Path("/tmp/pwned")
    before = pwned.stat().st_mtime_ns if pwned.exists() else None
    local = payload.replace("/tmp/pwned", str(tmp_path / "pwned"))
    reward = with_time_limit(exact_match_reward, 2.0)
    start = time.monotonic()
    for text in (payload, local):
        assert parse_number(text) is None
        assert parse_expression(text) is None
        assert parse_expression(text, max_length=10**6) is None   # depth limit, no recursion error
        assert exact_match(text, "1") == 0.0 and exact_match("1", text) == 0.0
        assert reward(["q"], [text], answer=["1"]) == [0.0]
        assert exact_match_reward(["q"], [text], answer=[text]) == [0.0]
    assert time.monotonic() - start < 1.0
    assert not (tmp_path / "pwned").exists() and list(tmp_path.iterdir()) == []
    assert (pwned.stat().st_mtime_ns if pwned.exists() else None) == before
    # later answers are still scored right
    assert reward(["q"] * 3, [" 7", "Answer: -2", payload], answer=["7", "-2", "7"]) == [
        1.0, 1.0, 0.0]


# ---------------------------------------------------------------- with_time_limit
def _restored():
    return signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)


def test_with_time_limit_passes_results_and_errors_through():
    before = _restored()
    limited = with_time_limit(exact_match_reward, 1.0)
    assert limited(["q", "q"], [" 1", " 2"], answer=["1", "1"]) == [1.0, 0.0]
    assert limited.__name__ == "exact_match_reward"
    with pytest.raises(ValueError):
        limited(["q"], [" 1"], answer=[])
    assert _restored() == before
    with pytest.raises(ValueError):
        with_time_limit(exact_match_reward, 0)


def _sleepy(prompts, completions, **kw):
    time.sleep(5)
    return [1.0] * len(completions)


def _stubborn(prompts, completions, **kw):
    while True:  # a reward function that swallows ordinary exceptions
        try:
            sum(range(1000))
        except Exception:
            pass


@pytest.mark.parametrize("fn", [_sleepy, _stubborn])
def test_with_time_limit_times_out_and_restores_the_process(fn):
    before = _restored()
    start = time.monotonic()
    assert with_time_limit(fn, 0.2)(["q"] * 3, ["a", "b", "c"]) == [0.0, 0.0, 0.0]
    assert 0.15 < time.monotonic() - start < 2.0
    assert _restored() == before
    assert with_time_limit(exact_match_reward, 1.0)(["q"], [" 5"], answer=["5"]) == [1.0]


def test_with_time_limit_keeps_an_enclosing_timer():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert with_time_limit(_sleepy, 0.1)(["q"], ["a"]) == [0.0]
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_with_time_limit_outside_the_main_thread():
    out = {}

    def work():
        limited = with_time_limit(
            lambda p, c, **kw: (time.sleep(0.5), [1.0] * len(c))[1], 0.05)
        out["slow"] = limited(["q"], ["a"])
        out["fast"] = with_time_limit(exact_match_reward, 1.0)(["q"], ["3"], answer=["3"])

    t = threading.Thread(target=work)
    t.start()
    t.join(5)
    assert out == {"slow": [0.0], "fast": [1.0]}
    assert os.getpid() and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("name", ["rlhf_jax.rewards.verifiers",
                                  "experiments.tasks.preference_world",
                                  "experiments.tasks.arithmetic"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.failed == 0 and result.attempted > 0
