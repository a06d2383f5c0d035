"""Named-axis device meshes: ``("data", "fsdp", "tensor")``.

* ``data``: pure data parallelism. The batch is split, params are replicated along it.
* ``fsdp``: the batch is split *and* the large parameter matrices (and their optimizer moments)
  are sharded along it (ZeRO-3 / fully sharded data parallelism): XLA all-gathers a weight just
  before it is used and reduce-scatters its gradient.
* ``tensor``: attention heads and the MLP hidden size are split along it (Megatron-style tensor
  parallelism); the batch is *not* split along it.

A ``MeshConfig`` names how many devices each axis gets; one axis may be ``-1`` ("the rest"), so
the same config runs on any device count that the fixed axes divide. Which parameter dimension
goes on which axis is data, kept per model family in ``parallel.rules``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Devices per mesh axis; at most one axis is ``-1`` (all the devices the others leave)."""

    data: int = -1
    """Data-parallel replicas (batch split, params replicated)."""
    fsdp: int = 1
    """Fully sharded data parallelism (batch split, large params and moments sharded)."""
    tensor: int = 1
    """Tensor parallelism (heads and MLP hidden size split)."""

    def __post_init__(self):
        sizes = self.sizes()
        bad = {a: n for a, n in zip(AXES, sizes) if n != -1 and n < 1}
        if bad:
            raise ValueError(f"mesh axis sizes must be >= 1 or -1 (the rest), got {bad}")
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1 (the rest), got {self}")

    def sizes(self) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` as configured (a ``-1`` left unresolved)."""
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The mesh shape for ``num_devices``; raises unless the axes use every device once."""
        sizes = self.sizes()
        fixed = math.prod(n for n in sizes if n != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {self._describe()} cannot fill {num_devices} devices: the fixed axes "
                    f"use {fixed}, which does not divide {num_devices}")
            sizes = tuple(num_devices // fixed if n == -1 else n for n in sizes)
        elif fixed != num_devices:
            raise ValueError(
                f"mesh {self._describe()} has {fixed} = {' x '.join(map(str, sizes))} devices "
                f"but {num_devices} are available; the product of the axis sizes must equal the "
                f"device count (set one axis to -1 to take the rest)")
        return sizes  # type: ignore[return-value]

    def _describe(self) -> str:
        return "(" + ", ".join(f"{a}={n}" for a, n in zip(AXES, self.sizes())) + ")"


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all).

    The device order comes from ``mesh_utils.create_device_mesh``, which on TPU/GPU keeps the
    inner (``tensor``) axis on the fastest interconnect; on CPU it is the plain order.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.resolve(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (AssertionError, NotImplementedError, ValueError):  # unusual topologies: plain order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def parse_mesh(text: str) -> MeshConfig | None:
    """A mesh from its command-line spelling: ``"auto"`` (``MeshConfig()``: data parallel over
    every device), ``"none"`` (one device) or ``"DATAxFSDPxTENSOR"`` such as ``"2x4x1"`` or
    ``"-1x2x1"`` (one ``-1`` = the rest).

    >>> parse_mesh("2x-1x1")
    MeshConfig(data=2, fsdp=-1, tensor=1)
    """
    spelled = text.strip().lower()
    if spelled == "auto":
        return MeshConfig()
    if spelled in ("none", "off", "1"):
        return None
    parts = spelled.split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise ValueError(f"mesh {text!r}: expected 'auto', 'none' or DATAxFSDPxTENSOR "
                         f"such as '2x4x1' (one axis may be -1)")
    return MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2])
