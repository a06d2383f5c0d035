"""JSONL datasets: strict reading, one validator per format, atomic writing.

Design choices, and why:
- Fail at load time, loudly. Every problem is a ``DataError`` naming the file, the 1-based line
  and the field (``data/train.jsonl:17: field 'chosen': expected a non-empty string, got int``),
  raised before any model is built or compiled. ``skip_invalid=True`` turns row errors into a
  count (and the first few messages) instead; a dataset that ends up empty is still an error.
- Lines are split on ``\\n`` only. ``str.splitlines`` would also split on U+2028, U+0085 and
  friends, which ``json.dumps(..., ensure_ascii=False)`` writes raw inside strings.
- Each line is decoded as strict UTF-8 by itself, so invalid bytes are reported with their line.
- One validator function per format in ``FORMATS``; config validation reads the same dict.
  Unknown extra fields are kept and passed through (e.g. ``answer`` for RLVR prompts).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rlhf_jax.fileio import atomic_open

_MAX_REASONS = 5
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A dataset problem, located as ``file:line: field 'name': what is wrong``."""


class _RowError(Exception):
    """A validator's complaint about one field of a row (located by the caller)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _where(path: str, line: int, field: str | None) -> str:
    return f"{path}:{line}: " + (f"field {field!r}: " if field is not None else "")


def _require_str(row: Mapping[str, Any], field: str, *, allow_empty: bool = False) -> None:
    if field not in row:
        raise _RowError(field, f"missing (the row has fields {sorted(row)})")
    _check_str(row[field], field, allow_empty=allow_empty)


def _check_str(value: Any, field: str, *, allow_empty: bool = False) -> None:
    what = "a string" if allow_empty else "a non-empty string"
    if not isinstance(value, str):
        raise _RowError(field, f"expected {what}, got {_type_name(value)}")
    if not allow_empty and not value:
        raise _RowError(field, f"expected {what}, got an empty string")


# --------------------------------------------------------------------------- validators
def validate_prompt_completion(row: Mapping[str, Any]) -> None:
    """``{"prompt": str, "completion": str}``, both non-empty."""
    _require_str(row, "prompt")
    _require_str(row, "completion")


def validate_messages(row: Mapping[str, Any]) -> None:
    """``{"messages": [{"role": system|user|assistant, "content": str}, ...]}``.

    At least one assistant message; contents non-empty except a system message's.
    """
    if "messages" not in row:
        raise _RowError("messages", f"missing (the row has fields {sorted(row)})")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise _RowError("messages", f"expected a list of messages, got {_type_name(messages)}")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _RowError(where, f"expected an object with 'role' and 'content', "
                                   f"got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _RowError(f"{where}.{key}", "missing")
        role = message["role"]
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"expected one of {list(ROLES)}, got {role!r}")
        _check_str(message["content"], f"{where}.content", allow_empty=role == "system")
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("messages", f"needs at least one assistant message, got roles "
                                    f"{[m['role'] for m in messages]}")


def validate_preference(row: Mapping[str, Any]) -> None:
    """``{"prompt": str, "chosen": str, "rejected": str}``, all non-empty (may be equal)."""
    for field in ("prompt", "chosen", "rejected"):
        _require_str(row, field)


def validate_prompt(row: Mapping[str, Any]) -> None:
    """``{"prompt": str}`` non-empty; other fields (``answer``, ...) pass through."""
    _require_str(row, "prompt")


FORMATS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "prompt_completion": validate_prompt_completion,
    "messages": validate_messages,
    "preference": validate_preference,
    "prompt": validate_prompt,
}
"""Format name -> validator; a validator raises on the first bad field of a row."""


def detect_format(row: Mapping[str, Any]) -> str:
    """The format a row looks like: messages, preference, prompt_completion, else prompt."""
    if "messages" in row:
        return "messages"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "completion" in row:
        return "prompt_completion"
    return "prompt"


def _check_fmt(fmt: str) -> Callable[[Mapping[str, Any]], None]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {list(FORMATS)}")
    return FORMATS[fmt]


# --------------------------------------------------------------------------- datasets
@dataclasses.dataclass(frozen=True, kw_only=True)
class Dataset:
    """Validated rows of one file, in file order.

    ``rows[i]`` came from line ``lines[i]`` (1-based) of ``path``; encoders use it in their
    errors. ``lines`` may be empty for rows built in memory: line ``i + 1`` is reported then.
    """

    path: str
    """The file (as given), or a name for in-memory rows."""
    fmt: str
    """A key of ``FORMATS``."""
    rows: tuple[dict[str, Any], ...]
    """The valid rows, unknown fields kept."""
    skipped: int = 0
    """Invalid rows dropped (only with ``skip_invalid=True``)."""
    skipped_reasons: tuple[str, ...] = ()
    """The first few of their error messages."""
    lines: tuple[int, ...] = ()
    """1-based source line of each row (empty: ``i + 1``)."""

    def __post_init__(self) -> None:
        _check_fmt(self.fmt)
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "lines", tuple(self.lines))
        if self.lines and len(self.lines) != len(self.rows):
            raise ValueError(f"{len(self.lines)} line numbers for {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.rows)

    def line(self, i: int) -> int:
        """1-based source line of ``rows[i]``."""
        return self.lines[i] if self.lines else i + 1

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], *, fmt: str, path: str = "<memory>",
                  skip_invalid: bool = False) -> Dataset:
        """Validate in-memory rows as ``load_jsonl`` does (row ``i`` reported as line i+1)."""
        validate = _check_fmt(fmt)
        parsed = [(i + 1, row, None) for i, row in enumerate(rows)]
        return _build(path, fmt, validate, parsed, skip_invalid)


def _build(path: str, fmt: str, validate, parsed: list[tuple[int, Any, str | None]],
           skip_invalid: bool) -> Dataset:
    """``parsed``: (line, row or None, error message or None) per non-blank line."""
    rows, lines, reasons = [], [], []
    for line, row, error in parsed:
        if error is None and not isinstance(row, dict):
            error = f"{_where(path, line, None)}expected a JSON object, got {_type_name(row)}"
        if error is None:
            try:
                validate(row)
            except _RowError as e:
                error = f"{_where(path, line, e.field)}{e.message}"
        if error is None:
            rows.append(row)
            lines.append(line)
        elif skip_invalid:
            reasons.append(error)
        else:
            raise DataError(error)
    if not rows:
        if reasons:
            raise DataError(f"{path}: no valid {fmt!r} rows: all {len(reasons)} rows were "
                            f"skipped as invalid; first: {reasons[0]}")
        raise DataError(f"{path}: no rows: the dataset is empty (0 non-blank lines)")
    return Dataset(path=path, fmt=fmt, rows=tuple(rows), skipped=len(reasons),
                   skipped_reasons=tuple(reasons[:_MAX_REASONS]), lines=tuple(lines))


def load_jsonl(path: str | os.PathLike[str], *, fmt: str, skip_invalid: bool = False
               ) -> Dataset:
    """Read and validate a JSONL file: one JSON object per line, blank lines ignored.

    Raises:
      DataError: invalid UTF-8, malformed JSON, a line that is not an object, a missing,
        wrong-typed or empty field (unless ``skip_invalid``), or no valid rows at all.
      ValueError: ``fmt`` is not a key of ``FORMATS``.
    """
    validate = _check_fmt(fmt)
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    parsed: list[tuple[int, Any, str | None]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            parsed.append((number, None, f"{_where(name, number, None)}invalid UTF-8 at byte "
                                         f"{e.start} of the line: {e.reason}"))
            continue
        if not text.strip():
            continue
        try:
            parsed.append((number, json.loads(text), None))
        except json.JSONDecodeError as e:
            parsed.append((number, None, f"{_where(name, number, None)}malformed JSON: {e}"))
    return _build(name, fmt, validate, parsed, skip_invalid)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept) atomically.

    The rows go to a fresh temporary file in the same directory, which then replaces ``path``
    (``fileio.atomic_open``): a crash leaves either the old file or the new one, never half of
    one. An existing file keeps its permissions (a new one gets 0644). NaN/Infinity are
    refused (they are not JSON).
    """
    name = os.fspath(path)
    mode = os.stat(name).st_mode & 0o777 if os.path.exists(name) else 0o644
    with atomic_open(name, mode=mode) as f:
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"rows[{i}] must be a dict, got {_type_name(row)}")
            f.write(json.dumps(dict(row), ensure_ascii=False, allow_nan=False) + "\n")
