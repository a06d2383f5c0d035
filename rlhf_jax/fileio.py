"""Atomic file writes and the output-path check: the bottom layer, importing nothing of ours.

Every file rlhf_jax writes in place (configs, results, JSONL data, tokenizer and model files,
the ledger, metric truncation) goes through here: write a fresh temporary file in the same
directory (``tempfile.mkstemp``: never a fixed ``*.tmp`` name a planted link could sit at),
fsync it, set its mode, and ``os.replace`` it over the destination. A crash leaves the old
file or the new one, never half of one; a symlink at the destination is replaced, never
written through; on any error the temporary file is removed and the old file is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: PathLike, *, mode: int = 0o644) -> Iterator[str]:
    """A fresh temporary path beside ``path`` to write by name (for writers that take a
    path, e.g. ``safetensors.numpy.save_file``); on a clean exit it is fsynced, given
    ``mode`` and renamed over ``path``; on an error it is removed."""
    name = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(name)),
                               prefix=f".{os.path.basename(name)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes the file private (0600)
        os.replace(tmp, name)  # replaces a symlink itself, never the file it points to
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike, *, binary: bool = False, mode: int = 0o644) -> Iterator[IO]:
    """``open(path, "w")`` that commits atomically on a clean exit (UTF-8, ``\\n`` newlines;
    ``binary=True``: bytes). For streaming writers; see the module docstring."""
    with atomic_path(path, mode=mode) as tmp:
        if binary:
            with open(tmp, "wb") as f:
                yield f
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                yield f


def atomic_write(path: PathLike, data: str | bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` atomically with permissions ``mode``."""
    with atomic_open(path, binary=isinstance(data, bytes), mode=mode) as f:
        f.write(data)


def atomic_write_json(path: PathLike, obj: Any, *, mode: int = 0o644,
                      sort_keys: bool = False) -> None:
    """``obj`` as indented JSON plus a final newline, written atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", mode=mode)


def check_inside(root: PathLike, path: PathLike, what: str) -> None:
    """Refuse ``path`` when it resolves (through a symlink, say) outside the directory ``root``:
    an output is never written through a link that leaves the output directory."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"refusing to write {what} at {os.fspath(path)!r}: it resolves to "
                         f"{real!r}, outside the output directory {real_root!r} (a symlink "
                         f"leaving it); remove the link or choose another output_dir")
