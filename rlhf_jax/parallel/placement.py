"""Putting host values onto a mesh and reading them back, in one process or in many.

In a multi-process (multi-host) run every process executes the same program on the same
*global* arrays, but holds only the shards of its own devices. Two things then change:

* **placing**: ``jax.device_put`` of a host array onto a sharding that spans other processes'
  devices is not allowed. ``put`` builds the global array with ``make_array_from_callback``:
  each process copies in only the rows/blocks its devices hold (all processes hold the same
  host value: same seed, same deterministic data stream).
* **reading**: ``np.asarray`` of an array with shards on other processes fails. ``fetch``
  gathers it (``process_allgather``) so every process gets the whole value.

In a single process both are the plain ``device_put`` / ``device_get``.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension is split over: ``data`` and ``fsdp`` (those
    the mesh has); ``tensor`` never splits the batch."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} include neither 'data' nor 'fsdp'")
    return axes


def batch_size_divisor(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the ``batch_axes`` sizes."""
    n = 1
    for a in batch_axes(mesh):
        n *= mesh.shape[a]
    return n


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``batch_axes(mesh)``; other axes whole."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def _put_leaf(x, sharding):
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding == sharding:
            return x
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # a reshard, all processes
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree, shardings):
    """Place ``tree`` (host or device arrays) with ``shardings`` (one ``Sharding`` for every
    leaf, or a matching tree of them). Multi-process safe: see the module docstring."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree.map(_put_leaf, tree, shardings)


def _fetch_leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def fetch(tree):
    """Every leaf of ``tree`` as a whole NumPy array on this process (gathered from the other
    processes when they hold some of its shards). All processes must call it together."""
    return jax.tree.map(_fetch_leaf, tree)


def from_main(x):
    """Process 0's value of the host array ``x``, on every process (``broadcast_one_to_all``).
    For values computed on the host by user code (reward functions) that must agree across
    processes before ``put`` places them. Free with one process."""
    if jax.process_count() == 1:
        return x
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (e.g. until process 0 has written a
    file the others read next). Free with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    """Process 0 writes logs, plots and exported models; the others only compute."""
    return jax.process_index() == 0
