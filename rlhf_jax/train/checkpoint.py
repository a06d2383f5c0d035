"""Orbax checkpoints of the whole ``TrainState`` plus JSON metadata (data position, ledger).

Saves are asynchronous (training continues while the previous step is written); Orbax commits a
step directory atomically, so a process killed mid-save leaves the previous complete step as the
latest. A state with a non-finite leaf is refused: NaN never reaches disk. Restoring needs the
target structure (``abstract_state``): a mismatch raises and names the differing path.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.parallel import fetch


def _non_finite_paths(state) -> list[str]:
    """Paths of floating leaves holding a NaN or inf. One jitted reduction over all of them,
    run where each leaf lives (so it works when other processes hold some of the shards)."""
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
              if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not leaves:
        return []
    finite = fetch(_all_finite([x for _, x in leaves]))
    return [name for (name, _), ok in zip(leaves, finite) if not ok]


@jax.jit
def _all_finite(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


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
    """Thin wrapper over ``ocp.CheckpointManager`` for (state, metadata) pairs."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        # Handlers named up front so a fresh manager can read an existing step's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, metadata: dict[str, Any], *, force: bool = False) -> bool:
        """Start saving ``state`` at ``step``; raises (saving nothing) if a leaf is non-finite."""
        bad = _non_finite_paths(state)
        if bad:
            raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite values in "
                                     f"{bad[:5]}")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(metadata))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int | None, abstract_state) -> tuple[Any, dict] | None:
        """``(state, metadata)`` of ``step`` (latest when None), or None if there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            stored = _leaf_specs(self._manager.item_metadata(step)["state"])
        except (KeyError, TypeError, AttributeError):  # no readable metadata: let Orbax check
            stored = None
        if stored:
            bad = _mismatches(stored, _leaf_specs(target))
            if bad:
                raise ValueError(f"checkpoint step {step} in {self.directory} does not match the "
                                 f"expected state: " + "; ".join(bad[:10]))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as e:
            raise ValueError(f"checkpoint step {step} in {self.directory} does not match the "
                             f"expected state: {e}") from e
        return out.state, dict(out.meta)

    def wait(self) -> None:
        """Block until pending saves are written; re-raises a failed async save."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
