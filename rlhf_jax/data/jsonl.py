"""JSONL datasets: strict reading, one validator per format, atomic writing.

Design choices, and why:
- Fail at load time, loudly. Every problem is a ``DataError`` naming the file, the 1-based line
  and the field (``data/train.jsonl:17: field 'chosen': expected a non-empty string, got int``),
  raised before any model is built or compiled. ``skip_invalid=True`` turns row errors into a
  count (and the first few messages) instead; a dataset that ends up empty is still an error.
- Lines are split on ``\\n`` only. ``str.splitlines`` would also split on U+2028, U+0085 and
  friends, which ``json.dumps(..., ensure_ascii=False)`` writes raw inside strings.
- Each line is decoded as strict UTF-8 by itself, so invalid bytes are reported with their line.
- One validator function per format in ``formats.FORMATS`` (TRL's formats, standard or
  conversational); ``fmt="auto"`` takes the format of the first row and holds every other row
  to it. Unknown extra fields are kept and passed through (e.g. ``answer`` for RLVR prompts).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from rlhf_jax.data.formats import FORMATS, RowError, detect_format, type_name
from rlhf_jax.fileio import atomic_open

_MAX_REASONS = 5


class DataError(ValueError):
    """A dataset problem, located as ``file:line: field 'name': what is wrong``."""


def _where(path: str, line: int, field: str | None) -> str:
    return f"{path}:{line}: " + (f"field {field!r}: " if field is not None else "")


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
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown dataset format {self.fmt!r}; expected one of "
                             f"{list(FORMATS)}")
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "lines", tuple(self.lines))
        if self.lines and len(self.lines) != len(self.rows):
            raise ValueError(f"{len(self.lines)} line numbers for {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.rows)

    def line(self, i: int) -> int:
        """1-based source line of ``rows[i]``."""
        return self.lines[i] if self.lines else i + 1

    @property
    def conversational(self) -> bool:
        """Whether the rows' text fields are conversations (rendered with the chat template)."""
        row = self.rows[0]
        return any(isinstance(row.get(k), list) for k in (
            "messages", "prompt", "completion", "chosen", "rejected"))

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], *, fmt: str = "auto",
                  path: str = "<memory>", skip_invalid: bool = False) -> Dataset:
        """Validate in-memory rows as ``load_jsonl`` does (row ``i`` reported as line i+1)."""
        parsed = [(i + 1, row, None) for i, row in enumerate(rows)]
        return build_dataset(path, fmt, parsed, skip_invalid)


def _check_fmt(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected 'auto' or one of "
                         f"{list(FORMATS)}")


def _first_format(path: str, parsed: list[tuple[int, Any, str | None]]) -> str:
    """The format of the first row that is a JSON object (``auto``)."""
    for line, row, error in parsed:
        if error is None and isinstance(row, dict):
            try:
                return detect_format(row)
            except RowError as e:
                raise DataError(f"{_where(path, line, None)}{e.message}") from None
    return "prompt"  # no object at all: build_dataset reports every row's own problem


def build_dataset(path: str, fmt: str, parsed: list[tuple[int, Any, str | None]],
                  skip_invalid: bool) -> Dataset:
    """Validate ``parsed``: (line, row or None, error message or None) per non-blank line.

    ``fmt="auto"``: the first object row's format (``formats.detect_format``), every row held
    to it.
    """
    _check_fmt(fmt)
    if fmt == "auto":
        fmt = _first_format(path, parsed)
    validate = FORMATS[fmt]
    rows, lines, reasons = [], [], []
    for line, row, error in parsed:
        if error is None and not isinstance(row, dict):
            error = f"{_where(path, line, None)}expected a JSON object, got {type_name(row)}"
        if error is None:
            try:
                validate(row)
            except RowError as e:
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
    conv = [isinstance(r.get(_TEXT_FIELD[fmt]), list) for r in rows]
    if fmt not in ("text", "messages") and len(set(conv)) > 1:
        i = conv.index(not conv[0])
        raise DataError(f"{_where(path, lines[i], _TEXT_FIELD[fmt])}mixes conversations and "
                        f"strings: line {lines[0]} has "
                        f"{'a conversation' if conv[0] else 'a string'}, this one not")
    return Dataset(path=path, fmt=fmt, rows=tuple(rows), skipped=len(reasons),
                   skipped_reasons=tuple(reasons[:_MAX_REASONS]), lines=tuple(lines))


_TEXT_FIELD = {"text": "text", "messages": "messages", "prompt": "prompt",
               "prompt_completion": "prompt", "preference": "chosen",
               "unpaired_preference": "prompt"}
"""The field whose kind (string or conversation) sets the row's (every row the same)."""


def load_jsonl(path: str | os.PathLike[str], *, fmt: str = "auto", skip_invalid: bool = False
               ) -> Dataset:
    """Read and validate a JSONL file: one JSON object per line, blank lines ignored.

    Raises:
      DataError: invalid UTF-8, malformed JSON, a line that is not an object, a missing,
        wrong-typed or empty field (unless ``skip_invalid``), or no valid rows at all.
      ValueError: ``fmt`` is neither ``"auto"`` nor a key of ``FORMATS``.
    """
    _check_fmt(fmt)
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
    return build_dataset(name, fmt, parsed, skip_invalid)


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
                raise TypeError(f"rows[{i}] must be a dict, got {type_name(row)}")
            f.write(json.dumps(dict(row), ensure_ascii=False, allow_nan=False) + "\n")
