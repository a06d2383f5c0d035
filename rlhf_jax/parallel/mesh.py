"""A 1-D data-parallel mesh over the local devices (the simplest mesh; ``config.make_mesh``
builds the named ``data x fsdp x tensor`` one).

A batch is split along its leading axis over ``data``; parameters and optimizer state are
replicated (``placement.batch_sharding`` / ``placement.replicated``). ``jax.jit`` with these
shardings is the current form of ``pmap``: XLA inserts the gradient all-reduce where the batch
sum crosses devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def data_parallel_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))
