"""Orbax checkpoints of the whole ``TrainState`` plus JSON metadata (data position, ledger).

Saves are asynchronous (training continues while the previous step is written); Orbax commits a
step directory atomically, so a process killed mid-save leaves the previous complete step as the
latest. A state with a non-finite leaf is refused: NaN never reaches disk. Each save records a
fingerprint of every leaf's bits, checked on restore, so a step whose files were damaged after
the commit (a truncated copy, bit rot) is caught instead of restored as garbage (TensorStore reads
an overwritten chunk without complaint). Restoring the latest step falls back to the newest
readable one, moving damaged steps aside and saying so; restoring a named step never falls back.
Restoring needs the target structure (``abstract_state``): a mismatch raises and names the
differing path (a config change, not damage: no fallback). A directory that cannot be written
fails at construction, in one line, instead of in Orbax's background save thread.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.parallel import barrier, fetch, is_main_process


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be written, or no checkpoint in it that can be read."""


class _Damaged(Exception):
    """A step whose files cannot be read back as they were saved (internal: triggers fallback)."""


def _leaf_checks(state) -> tuple[list[str], list[str], list[int]]:
    """``(paths, non-finite paths, fingerprints)`` of every leaf, from one jitted pass run where
    each leaf lives (so it works when other processes hold some of the shards)."""
    named = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)]
    if not named:
        return [], [], []
    finite, prints = fetch(_checks([x for _, x in named]))
    bad = [name for (name, x), ok in zip(named, finite) if not ok]
    return [n for n, _ in named], bad, [int(v) for v in prints]


def _fingerprint(x) -> jax.Array:
    """A position-weighted sum of the leaf's bits, modulo 2^32: any changed, swapped or zeroed
    element changes it (with probability ~1 - 2^-32), and integer addition makes it exact under
    any sharding or reduction order."""
    x = jnp.ravel(jnp.asarray(x))
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    weights = jnp.arange(x.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checks(leaves):
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating)
              else jnp.bool_(True) for x in leaves]
    return jnp.stack(finite), jnp.stack([_fingerprint(x) for x in leaves])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"params.w": (shape, dtype)}`` of a state or of Orbax's on-disk metadata tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[".".join(_key_name(k) for k in path)] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def _mismatches(stored, expected) -> list[str]:
    """Paths that differ between the checkpoint and the target (missing, extra, shape, dtype).

    Orbax would raise on a missing or extra path, but silently *casts* a different dtype, and
    its shape error names no path; checking first makes every mismatch loud and named.
    """
    problems = [f"{k}: in the checkpoint, not in the target" for k in stored.keys() - expected]
    problems += [f"{k}: in the target, not in the checkpoint" for k in expected.keys() - stored]
    for k in sorted(stored.keys() & expected.keys()):
        if stored[k] != expected[k]:
            problems.append(f"{k}: checkpoint has {stored[k][0]} {stored[k][1]}, "
                            f"target expects {expected[k][0]} {expected[k][1]}")
    return sorted(problems)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for (state, metadata) pairs.

    ``read_only``: open another run's checkpoints to restore from (nothing is created or saved).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        if read_only:
            if not os.path.isdir(self.directory):
                raise CheckpointError(f"no checkpoint directory at {self.directory}")
        else:
            check_writable(self.directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # Handlers named up front so a fresh manager can read an existing step's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, metadata: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving ``state`` at ``step``; raises (saving nothing) if a leaf is non-finite.
        The metadata gains ``fingerprints`` (leaf path -> ``_fingerprint``), checked on restore."""
        paths, bad, prints = _leaf_checks(state)
        if bad:
            raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite values in "
                                     f"{bad[:5]}")
        meta = dict(metadata) | {"fingerprints": dict(zip(paths, prints))}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int | None, abstract_state, *,
                say: Callable[[str], None] | None = None) -> tuple[Any, dict] | None:
        """``(state, metadata)`` of ``step``, or of the newest readable step when None (None if
        there is none). A damaged latest step is moved to ``<directory>.damaged/`` and the next
        one tried, each fallback reported through ``say``; a damaged named step raises
        ``CheckpointError``; a structure mismatch raises ``ValueError`` either way."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        damaged = []
        for s in steps:
            try:
                out = self._restore_step(s, target)
            except _Damaged as e:
                if step is not None:
                    raise CheckpointError(f"checkpoint step {s} in {self.directory} is damaged "
                                          f"({e}); choose another step") from None
                damaged.append((s, str(e)))
                continue
            self._set_aside(damaged, s, say)
            return out
        if damaged:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: " + "; ".join(
                    f"step {s}: {why}" for s, why in damaged) + ". Delete the run directory to "
                "start over, or start from another run with loop.resume_from=PATH")
        return None

    def _restore_step(self, step: int, target) -> tuple[Any, dict]:
        try:
            stored = _leaf_specs(self._manager.item_metadata(step)["state"])
        except (KeyError, TypeError, AttributeError):  # no metadata file: let Orbax check
            stored = None
        except Exception as e:  # noqa: BLE001  unreadable metadata: damaged
            raise _Damaged(_first_line(e)) from None
        if stored:
            bad = _mismatches(stored, _leaf_specs(target))
            if bad:
                raise ValueError(f"checkpoint step {step} in {self.directory} does not match the "
                                 f"expected state: " + "; ".join(bad[:10]))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  the structure matched: the files are at fault
            raise _Damaged(_first_line(e)) from None
        meta = dict(out.meta)
        expected = meta.pop("fingerprints", None)  # absent in checkpoints made before them
        if expected is not None:
            paths, _, prints = _leaf_checks(out.state)
            changed = [p for p, v in zip(paths, prints) if expected.get(p) != v]
            if changed:
                raise _Damaged(f"{len(changed)} arrays differ from what was saved, e.g. "
                               f"{changed[0]}")
        return out.state, meta

    def _set_aside(self, damaged: list[tuple[int, str]], restored: int, say) -> None:
        """Move damaged steps out of Orbax's sight (a later save of the same step would collide
        with them), kept for inspection; report each fallback."""
        if not damaged:
            return
        where = ""
        if not self.read_only:
            where = f"moved to {self._move([s for s, _ in damaged], 'damaged')}/; "
        if say is not None:
            for s, why in damaged:
                say(f"checkpoint step {s} in {self.directory} is damaged ({why}); {where}"
                    f"falling back to step {restored}")

    def set_aside_after(self, step: int) -> list[int]:
        """Move every step newer than ``step`` into ``<directory>.superseded/`` (resuming from an
        earlier step: their numbers will be saved again). Returns the steps moved."""
        newer = [s for s in self.all_steps() if s > step]
        if newer:
            self._move(newer, "superseded")
        return newer

    def _move(self, steps: list[int], why: str) -> str:
        """Move ``steps`` to ``<directory>.<why>/<step>-<unix time>`` (process 0; the others
        wait) and reload the manager so it forgets them. Returns the folder."""
        aside = f"{self.directory}.{why}"
        if is_main_process():
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                shutil.move(os.path.join(self.directory, str(s)),
                            os.path.join(aside, f"{s}-{int(time.time())}"))
        barrier(f"checkpoints {why} in {self.directory}")
        self._manager.reload()
        return aside

    def wait(self) -> None:
        """Block until pending saves are written; re-raises a failed async save."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def check_writable(directory: str) -> None:
    """Create ``directory`` and a file in it, or raise ``CheckpointError`` in one line (Orbax
    would start, then fail in its save thread and hang in its directory-creation retries)."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {directory}: "
                              f"{e.strerror or e} (make it writable, or choose another "
                              f"output_dir)") from None
