"""A resumable, shuffling batch iterator over in-memory arrays.

Design choices, and why:
- The order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the examples in
  ``np.random.default_rng([seed, e]).permutation(N)``. So the whole position is four integers
  (``state()``), stored as JSON beside a checkpoint, and a restored iterator serves exactly
  the batches the original would have: nothing repeated, nothing skipped.
- Fixed shapes: the last ``N mod batch_size`` examples of each epoch's permutation are dropped
  (a different subset each epoch when shuffling), so every batch has ``batch_size`` rows and
  the step compiles once.
- Any pytree of arrays sharing the leading axis ``N`` (``TokenBatch``, ``PreferenceBatch``,
  ``PromptBatch``, dicts, tuples of these) is batched leaf by leaf, keeping its structure.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_KEYS = ("epoch", "index", "seed", "batches")


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


class BatchIterator:
    """Batches of ``batch_size`` examples, epoch after epoch, resumable from ``state()``.

    Args:
      data: a pytree of arrays, every leaf ``[N, ...]``.
      batch_size: examples per batch ``B`` (``1 <= B <= N``).
      seed: non-negative int; the order of epoch ``e`` is ``default_rng([seed, e])``'s
        permutation (the identity with ``shuffle=False``).

      unit: what one of the ``N`` rows is, for messages ("packed rows of 512 tokens (from 300
        examples)" when a stage packed its examples).

    ``next()`` returns the same pytree structure with leaves ``[B, ...]``.
    """

    def __init__(self, data: Any, *, batch_size: int, seed: int, shuffle: bool = True,
                 unit: str = "examples"):
        leaves, self._treedef = jax.tree_util.tree_flatten(data)
        if not leaves:
            raise ValueError("BatchIterator needs at least one array in data")
        self._leaves = [np.asarray(leaf) for leaf in leaves]
        sizes = {leaf.shape[0] if leaf.ndim else None for leaf in self._leaves}
        if None in sizes or len(sizes) != 1:
            shapes = [leaf.shape for leaf in self._leaves]
            raise ValueError(f"every array in data needs the same leading axis N; got shapes "
                             f"{shapes}")
        self._n = sizes.pop()
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self._n < batch_size:
            raise ValueError(f"the dataset has {self._n} {unit}, fewer than batch_size="
                             f"{batch_size}: not even one full batch")
        if not _is_count(seed):
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
        self._epoch, self._index, self._batches = 0, 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """``N // batch_size``: full batches per epoch (the remainder is dropped)."""
        return self._n // self._batch_size

    @property
    def num_examples(self) -> int:
        """``N``."""
        return self._n

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self._seed, epoch]).permutation(self._n)
                     if self._shuffle else np.arange(self._n))
            self._cached = (epoch, order)
        return self._cached[1]

    def _normalise(self) -> None:
        # Start a new epoch as soon as the current one cannot fill a batch, so a saved state
        # at an epoch boundary reads (epoch + 1, index 0).
        if self._index + self._batch_size > self._n:
            self._epoch, self._index = self._epoch + 1, 0

    def next(self) -> Any:
        """The next batch (leaves ``[B, ...]``), advancing the position."""
        idx = self._order(self._epoch)[self._index:self._index + self._batch_size]  # [B]
        batch = self._treedef.unflatten([leaf[idx] for leaf in self._leaves])
        self._index += self._batch_size
        self._batches += 1
        self._normalise()
        return batch

    __next__ = next

    def __iter__(self) -> BatchIterator:
        return self

    def state(self) -> dict[str, int]:
        """The position as JSON-ready ints: epoch, index (within the epoch's order), seed,
        batches (served in all) and num_examples (checked on restore)."""
        return {"epoch": self._epoch, "index": self._index, "seed": self._seed,
                "batches": self._batches, "num_examples": self._n}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()`` of an iterator over the same data and seed.

        Raises:
          ValueError: a missing or non-integer entry, a different seed or dataset size, or an
            index past the end of the epoch.
        """
        if not isinstance(state, dict):
            raise ValueError(f"iterator state must be a dict, got {type(state).__name__}")
        missing = [k for k in _KEYS if k not in state]
        if missing:
            raise ValueError(f"iterator state lacks {missing}; got keys {sorted(state)}")
        bad = {k: state[k] for k in _KEYS if not _is_count(state[k])}
        if bad:
            raise ValueError(f"iterator state entries must be non-negative ints, got {bad}")
        if state["seed"] != self._seed:
            raise ValueError(f"iterator state was saved with seed={state['seed']} but this "
                             f"iterator has seed={self._seed}; resuming would change the order")
        n = state.get("num_examples", self._n)
        if n != self._n:
            raise ValueError(f"iterator state was saved over {n} examples but this dataset has "
                             f"{self._n}; resuming would serve different data")
        if state["index"] > self._n:
            raise ValueError(f"iterator state index={state['index']} is past the end of an "
                             f"epoch of {self._n} examples")
        self._epoch, self._index, self._batches = state["epoch"], state["index"], state["batches"]
        self._normalise()
