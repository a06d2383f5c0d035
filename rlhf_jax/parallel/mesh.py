"""Data-parallel mesh over the local devices, and the shardings the trainer places arrays with.

A batch is split along its leading axis over the ``data`` mesh axis; parameters and optimizer
state are replicated. ``jax.jit`` with these shardings is the current form of ``pmap``: XLA
inserts the gradient all-reduce where the batch sum crosses devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_parallel_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())
