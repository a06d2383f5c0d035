"""Atomic file writes and the output-path check: the bottom layer, importing nothing of ours.

Every file rlhf_jax writes in place (configs, results, JSONL data, tokenizer and model files,
the ledger, metric truncation) goes through here: create a fresh temporary file in the same
directory (a random name opened with ``O_CREAT | O_EXCL``: never a fixed ``*.tmp`` name a
planted link could sit at), fsync it, and ``os.replace`` it over the destination. A crash
leaves the old file or the new one, never half of one; a symlink at the destination is
replaced, never written through; on any error the temporary file is removed and the old file
is untouched.

Permissions are those a plain ``open(path, "w")`` gives: a new file gets ``0o666 & ~umask``
(the temporary is created with mode 0o666 and the kernel applies the umask, so every file of
an exported directory gets the same bits), an existing file keeps its own mode; ``mode=``
sets them explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from typing import IO, Any, Iterator

PathLike = str | os.PathLike[str]


def _existing_mode(name: str) -> int | None:
    """The permission bits of a regular file at ``name`` (kept on replace, as ``open`` keeps
    them), or None: no file, or a symlink (which is replaced, never followed)."""
    try:
        st = os.lstat(name)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _create_temporary(name: str) -> str:
    """A new empty file beside ``name`` with a random name, created exclusively (a planted
    file or link at that name fails the open) with mode 0o666 less the process umask."""
    directory = os.path.dirname(os.path.abspath(name))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(name)}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {name!r} after 100 tries")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, mode: int | None = None) -> Iterator[str]:
    """A fresh temporary path beside ``path`` to write by name (for writers that take a
    path, e.g. ``safetensors.numpy.save_file``); on a clean exit it is fsynced and renamed
    over ``path``; on an error it is removed. ``mode`` None: an existing file's permissions
    are kept, a new file gets ``0o666 & ~umask`` (see the module docstring)."""
    name = os.fspath(path)
    keep = _existing_mode(name) if mode is None else mode
    tmp = _create_temporary(name)
    try:
        if keep is None:  # what the kernel gave the new file: 0o666 & ~umask, read race-free
            keep = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, keep)  # also for writers that replace the path (safetensors: 0600)
        os.replace(tmp, name)  # replaces a symlink itself, never the file it points to
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike, *, binary: bool = False,
                mode: int | None = None) -> Iterator[IO]:
    """``open(path, "w")`` that commits atomically on a clean exit (UTF-8, ``\\n`` newlines;
    ``binary=True``: bytes). For streaming writers; see the module docstring."""
    with atomic_path(path, mode=mode) as tmp:
        if binary:
            with open(tmp, "wb") as f:
                yield f
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                yield f


def atomic_write(path: PathLike, data: str | bytes, *, mode: int | None = None) -> None:
    """Write ``data`` (str: UTF-8) to ``path`` atomically (``mode``: see ``atomic_path``)."""
    with atomic_open(path, binary=isinstance(data, bytes), mode=mode) as f:
        f.write(data)


def atomic_write_json(path: PathLike, obj: Any, *, mode: int | None = None,
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
