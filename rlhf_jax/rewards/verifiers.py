"""Safe verifiers for RL with verifiable rewards: small grammars, hard limits, a time limit.

Nothing a model or a dataset wrote is ever run as code: answers are read by ``parse_number``
and expressions by ``parse_expression``, a tiny recursive-descent parser over exact fractions
with limits on length, nesting depth, digits and magnitude. No Python builtins that run text,
no ``ast`` compilation, no computer-algebra parsing, no object deserialisation. Anything outside
the grammar is ``None`` and scores 0.0.

A reward function has the TRL signature ``fn(prompts, completions, **columns) -> list[float]``:
dataset columns (here ``answer``) arrive as keyword lists aligned with ``completions``.
``REWARD_FUNCTIONS`` is the table a pipeline picks from by name.
"""

from __future__ import annotations

import functools
import signal
import string
import threading
import time
from collections.abc import Callable
from fractions import Fraction

MAX_NUMBER_CHARS = 64
"""``parse_number`` looks at no more than this many characters (after stripping)."""
MAX_DIGITS = 30
"""Most digits in one number literal."""
MAX_MAGNITUDE = 10**30
"""``parse_expression`` gives up on a value, numerator or denominator larger than this."""
_PUNCTUATION = frozenset(string.punctuation) - {"_"}
_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() would accept "٣" and "²"


def _digits_at(s: str, i: int) -> int:
    """Index just past the run of ASCII digits starting at ``i``."""
    while i < len(s) and s[i] in _DIGITS:
        i += 1
    return i


def _read_literal(s: str, i: int, *, allow_fraction: bool) -> tuple[Fraction, int] | None:
    """An unsigned ``digits ["." digits | "/" digits]`` at ``i`` -> (value, end) or None."""
    j = _digits_at(s, i)
    if j == i:
        return None
    whole, k = s[i:j], j
    frac, denom = "", ""
    if k + 1 < len(s) and s[k] == "." and s[k + 1] in _DIGITS:
        k2 = _digits_at(s, k + 1)
        frac, k = s[k + 1:k2], k2
    elif allow_fraction and k + 1 < len(s) and s[k] == "/" and s[k + 1] in _DIGITS:
        k2 = _digits_at(s, k + 1)
        denom, k = s[k + 1:k2], k2
    if len(whole) + len(frac) + len(denom) > MAX_DIGITS:
        return None
    if denom:
        if int(denom) == 0:
            return None
        return Fraction(int(whole), int(denom)), k
    return Fraction(int(whole + frac), 10 ** len(frac)), k


def parse_number(text: str) -> Fraction | None:
    """The final answer of a completion as an exact fraction, or None.

    Grammar (EBNF), applied to the first 64 characters of ``text.strip()``::

        answer   = [ prefix , { ws } ] , number , [ rest ] ;
        prefix   = "Answer:" | "answer:" | "ANSWER:" | "=" ;
        number   = [ "+" | "-" ] , digits , [ "." , digits | "/" , digits ] ;
        digits   = digit , { digit } ;            (* ASCII 0-9; at most 30 digits in all *)
        rest     = boundary , { any character } ;
        boundary = whitespace | ASCII punctuation other than "_" ;
        ws       = " " | "\\t" | "\\n" | "\\r" ;

    So ``" 40"``, ``"Answer: -7"``, ``"= 3/4"``, ``"2.50 apples"`` and ``"40."`` parse, while
    ``"40abc"``, ``"1e9"``, ``"1/0"``, ``"forty"``, ``"٣"``, ``"4\\x00"`` and a 31-digit number
    do not.

    >>> parse_number("Answer: 1.25")
    Fraction(5, 4)
    """
    if not isinstance(text, str):
        return None
    s = text.strip()[:MAX_NUMBER_CHARS]
    for prefix in ("Answer:", "answer:", "ANSWER:", "="):
        if s.startswith(prefix):
            s = s[len(prefix):].lstrip(" \t\r\n")
            break
    sign, i = 1, 0
    if s[:1] in ("+", "-"):
        sign, i = (-1 if s[0] == "-" else 1), 1
    read = _read_literal(s, i, allow_fraction=True)
    if read is None:
        return None
    value, end = read
    if end < len(s) and not (s[end].isspace() or s[end] in _PUNCTUATION):
        return None
    return sign * value


class _Reject(Exception):
    """Raised inside the expression parser; ``parse_expression`` turns it into None."""


class _ExprParser:
    """Recursive descent over ``expr = term {(+|-) term}``, ``term = unary {(*|/) unary}``,
    ``unary = (-|+) unary | atom``, ``atom = number | "(" expr ")"``."""

    def __init__(self, text: str, max_depth: int):
        self.s, self.i, self.depth, self.max_depth = text, 0, 0, max_depth

    def _peek(self) -> str:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1
        return self.s[self.i] if self.i < len(self.s) else ""

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _Reject("too deep")

    @staticmethod
    def _bounded(x: Fraction) -> Fraction:
        if abs(x.numerator) > MAX_MAGNITUDE or x.denominator > MAX_MAGNITUDE:
            raise _Reject("too large")
        return x

    def parse(self) -> Fraction:
        value = self.expr()
        if self._peek():
            raise _Reject("trailing input")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while (op := self._peek()) in ("+", "-"):
            self.i += 1
            rhs = self.term()
            value = self._bounded(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (op := self._peek()) in ("*", "/"):
            self.i += 1
            rhs = self.unary()
            if op == "/" and rhs == 0:
                raise _Reject("division by zero")
            value = self._bounded(value * rhs if op == "*" else value / rhs)
        return value

    def unary(self) -> Fraction:
        op = self._peek()
        if op in ("-", "+"):
            self.i += 1
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.atom()

    def atom(self) -> Fraction:
        if self._peek() == "(":
            self.i += 1
            self._enter()
            value = self.expr()
            if self._peek() != ")":
                raise _Reject("missing )")
            self.i += 1
            self.depth -= 1
            return value
        read = _read_literal(self.s, self.i, allow_fraction=False)
        if read is None:
            raise _Reject("expected a number")
        value, self.i = read
        return self._bounded(value)


def parse_expression(text: str, *, max_depth: int = 16, max_length: int = 256) -> Fraction | None:
    """Exact value of an arithmetic expression, or None. The text is parsed, never run.

    Grammar (EBNF); spaces and tabs may separate tokens::

        expr   = term , { ( "+" | "-" ) , term } ;
        term   = unary , { ( "*" | "/" ) , unary } ;
        unary  = ( "-" | "+" ) , unary | atom ;
        atom   = number | "(" , expr , ")" ;
        number = digits , [ "." , digits ] ;     (* ASCII digits, at most 30 *)

    None for: text longer than ``max_length``; parentheses plus unary signs nested deeper than
    ``max_depth``; division by zero; any literal or intermediate value whose numerator or
    denominator exceeds 10**30; anything outside the grammar.

    >>> parse_expression("2 * (3 + 4) / -7")
    Fraction(-2, 1)
    """
    if not 1 <= max_depth <= 100:  # recursion stays far below Python's limit
        raise ValueError(f"max_depth must be in [1, 100], got {max_depth}")
    if not isinstance(text, str) or len(text) > max_length:
        return None
    try:
        return _ExprParser(text, max_depth).parse()
    except _Reject:
        return None


def exact_match(completion: str, answer: str) -> float:
    """1.0 when ``parse_number`` reads equal values from both, else 0.0 (also when either fails).

    >>> exact_match(" 40", "40"), exact_match("Answer: 0.5", "1/2"), exact_match("41", "40")
    (1.0, 1.0, 0.0)
    """
    got, want = parse_number(completion), parse_number(answer)
    return 1.0 if got is not None and want is not None and got == want else 0.0


def _completion_text(completion) -> str | None:
    """A plain string, or the content of the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else None
    return None


def exact_match_reward(prompts: list[str], completions: list, *, answer: list[str],
                       **kwargs) -> list[float]:
    """TRL-style reward: ``exact_match(completions[i], answer[i])`` for each i.

    Completions may be strings or conversational (a list of ``{"role", "content"}`` messages,
    the last one scored). Other dataset columns in ``kwargs`` are ignored.
    """
    if len(answer) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, want in zip(completions, answer):
        text = _completion_text(completion)
        rewards.append(0.0 if text is None else exact_match(text, str(want)))
    return rewards


class _Timeout(BaseException):
    """A BaseException, so an ``except Exception`` inside the reward function cannot swallow it."""


def _call_with_alarm(fn: Callable, seconds: float, args, kwargs):
    """(True, result) or (False, None) on timeout, via SIGALRM; restores handler and timer."""
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Timeout()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        try:
            return True, fn(*args, **kwargs)
        finally:
            armed[0] = False  # an alarm that lands from here on is ignored
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return False, None
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # an enclosing timer keeps its remaining time
            remaining = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


def _call_in_thread(fn: Callable, seconds: float, args, kwargs):
    """(True, result) or (False, None) on timeout, via a daemon worker thread."""
    box: dict = {}

    def work():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True, name="reward-time-limit")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box["result"]


def with_time_limit(fn: Callable, seconds: float) -> Callable:
    """Wrap a TRL-style reward function so each call has ``seconds``; on timeout all 0.0.

    In the main thread of a POSIX process the limit is a ``SIGALRM`` interval timer: it raises a
    private ``BaseException`` inside ``fn`` (so ``except Exception`` there cannot swallow it),
    which unwinds ``fn`` normally; the previous signal handler and any enclosing timer (with
    its remaining time) are restored afterwards, so the process is left as it was. A Python
    signal handler runs between bytecodes, so one long C call (a huge ``int`` power, say) is
    only interrupted after it returns; the verifiers here bound their inputs so no call is long.
    Elsewhere (another thread, no SIGALRM, or a SIGALRM handler installed outside Python)
    ``fn`` runs in a daemon worker thread joined with a timeout; a worker that overruns cannot
    be stopped and finishes in the background, its result discarded.

    Exceptions raised by ``fn`` propagate unchanged.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")

    @functools.wraps(fn)
    def limited(prompts, completions, **kwargs):
        finished, result = call_limited(fn, seconds, (prompts, completions), kwargs)
        return result if finished else [0.0] * len(completions)

    return limited


def call_limited(fn: Callable, seconds: float, args: tuple, kwargs: dict):
    """``(True, fn(*args, **kwargs))``, or ``(False, None)`` when the call overran
    ``seconds`` (the mechanism of ``with_time_limit``); exceptions of ``fn`` propagate."""
    use_alarm = (hasattr(signal, "setitimer")
                 and threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGALRM) is not None)  # None: set outside Python
    call = _call_with_alarm if use_alarm else _call_in_thread
    return call(fn, seconds, args, kwargs)


REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {
    "exact_match": exact_match_reward,
}
"""Reward functions by name; pipelines and config validation read this same table."""
