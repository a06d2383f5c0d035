"""Tests of rlhf_jax/fileio.py: content and permissions (what ``open`` gives: umask for a new
file, the old mode for a replaced one), a symlink at the destination replaced
(its target untouched), a link leaving the root refused, and a failed write leaving the old file
and no temporary behind."""

from __future__ import annotations

import json
import os
import secrets
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from rlhf_jax.fileio import (atomic_open, atomic_path, atomic_write, atomic_write_json,
                             check_inside)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=oct)
def umask(request):
    """Run the test under this umask (process-wide, restored after)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_new_files_get_what_open_gives(tmp_path, umask):
    """Like ``open(path, "w")``: 0o666 less the umask, whichever writer made the file (the
    by-name writer too: safetensors writes the temporary path), and the same as a plain file."""
    (tmp_path / "plain.txt").write_text("x")
    atomic_write(tmp_path / "a.txt", "a")
    atomic_write_json(tmp_path / "c.json", {"x": 1})
    with atomic_open(tmp_path / "b.bin", binary=True) as f:
        f.write(b"b")
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"w": np.zeros(2, np.float32)}, tmp)
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(
        ["plain.txt", "a.txt", "c.json", "b.bin", "w.safetensors"], 0o666 & ~umask)


def test_existing_mode_is_kept_and_explicit_mode_wins(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    atomic_write(target, "new")  # replacing keeps the file's mode, as open() does
    assert (target.read_text(), _mode(target)) == ("new", 0o600)
    atomic_write(target, "newer", mode=0o640)
    assert _mode(target) == 0o640
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.chmod(victim, 0o600)
    (tmp_path / "link").symlink_to(victim)  # a link is replaced; its target's mode is not taken
    atomic_write(tmp_path / "link", "x")
    assert _mode(tmp_path / "link") == 0o666 & ~_umask() and _mode(victim) == 0o600


def test_a_planted_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    """The temporary is created exclusively: a file or link already at the drawn name is
    skipped (a fresh name is drawn), never opened."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / ".t.txt.000000000000.tmp").symlink_to(victim)
    names = iter(["000000000000", "111111111111"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    atomic_write(tmp_path / "t.txt", "new")
    assert (tmp_path / "t.txt").read_text() == "new" and victim.read_text() == "keep"


def test_content_and_permissions(tmp_path):
    atomic_write(tmp_path / "a.txt", "héllo\n")
    atomic_write(tmp_path / "b.bin", b"\x00\xff", mode=0o600)
    atomic_write_json(tmp_path / "c.json", {"b": [1, 2.5], "a": None}, sort_keys=True)
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "c.json").read_text() == ('{\n  "a": null,\n  "b": [\n    1,\n'
                                                 '    2.5\n  ]\n}\n')
    assert (_mode(tmp_path / "a.txt"), _mode(tmp_path / "b.bin")) == (0o666 & ~_umask(), 0o600)
    atomic_write(tmp_path / "a.txt", "new")  # replaces an existing file
    assert (tmp_path / "a.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.json"]  # no temporaries


@settings(max_examples=25, deadline=None)
@given(text=st.text(), chunks=st.lists(st.binary(), max_size=4))
def test_round_trip_property(tmp_path_factory, text, chunks):
    d = tmp_path_factory.mktemp("prop")
    atomic_write(d / "t", text)
    with atomic_open(d / "b", binary=True) as f:
        for c in chunks:
            f.write(c)
    assert (d / "t").read_bytes() == text.encode("utf-8")
    assert (d / "b").read_bytes() == b"".join(chunks)
    assert sorted(os.listdir(d)) == ["b", "t"]


def test_symlink_at_destination_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    atomic_write_json(out / "config.json", {"x": 1})
    assert not (out / "config.json").is_symlink()
    assert json.loads((out / "config.json").read_text()) == {"x": 1}
    assert victim.read_text() == "keep me"


def test_check_inside_refuses_a_link_leaving_root(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "model").symlink_to(outside)
    (root / "inner").symlink_to(root / "sub")
    check_inside(root, root / "metrics.jsonl", "metrics")  # a plain path inside
    check_inside(root, root / "inner" / "x", "x")  # a link that stays inside
    with pytest.raises(ValueError, match="refusing to write the model directory .* outside the "
                                         "output directory"):
        check_inside(root, root / "model", "the model directory")
    with pytest.raises(ValueError, match="outside"):
        check_inside(root, root / ".." / "elsewhere" / "f", "f")


class _Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["write", "open", "path", "json"])
def test_failure_keeps_old_file_and_leaves_no_temporary(tmp_path, how):
    target = tmp_path / "data.jsonl"
    target.write_text("old\n")
    with pytest.raises((_Boom, TypeError)):
        if how == "write":
            atomic_write(target, 42)  # neither str nor bytes: fails inside the write
        elif how == "open":
            with atomic_open(target) as f:
                f.write("half a line")
                raise _Boom
        elif how == "path":
            with atomic_path(target) as tmp:
                with open(tmp, "w") as f:
                    f.write("half")
                raise _Boom
        else:
            atomic_write_json(target, {"not json": object()})
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["data.jsonl"]
