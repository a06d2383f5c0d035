"""``parallel.placement`` in one process (the multi-process paths run in test_multiprocess.py):
batch axes of each mesh shape, ``put`` placing a tree and never copying what is already in
place (the pipelines place a frozen teacher once and both steps share it), ``fetch`` returning
whole NumPy arrays, and the multi-process helpers reducing to no-ops."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.parallel import (barrier, batch_axes, batch_sharding, batch_size_divisor, fetch,
                               from_main, is_main_process, put, replicated)
from tests.parallel.common import IDS, SHAPES, mesh_for


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_batch_axes_are_data_and_fsdp(shape):
    mesh = mesh_for(shape)
    assert batch_axes(mesh) == ("data", "fsdp")
    assert batch_size_divisor(mesh) == shape[0] * shape[1]
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_batch_axes_need_data_or_fsdp():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1), ("tensor",))
    with pytest.raises(ValueError, match="neither 'data' nor 'fsdp'"):
        batch_axes(mesh)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_put_places_and_fetch_gathers(shape):
    mesh = mesh_for(shape)
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    tree = {"rows": rows, "scalar": np.float32(2.5)}
    placed = put(tree, {"rows": batch_sharding(mesh), "scalar": replicated(mesh)})
    assert placed["rows"].sharding.is_equivalent_to(batch_sharding(mesh), 2)
    blocks = {tuple((i.start, i.stop) for i in s.index) for s in placed["rows"].addressable_shards}
    assert len(blocks) == batch_size_divisor(mesh)  # distinct row blocks: really split
    back = fetch(placed)
    assert isinstance(back["rows"], np.ndarray)
    np.testing.assert_array_equal(back["rows"], rows)
    assert back["scalar"] == np.float32(2.5)
    one = put(tree, replicated(mesh))  # one sharding for every leaf
    assert all(x.sharding.is_equivalent_to(replicated(mesh), x.ndim) for x in jax.tree.leaves(one))


def test_put_does_not_copy_what_is_already_in_place():
    mesh = mesh_for((8, 1, 1))
    placed = put({"w": np.ones((8, 4), np.float32)}, replicated(mesh))
    again = put(placed, replicated(mesh))
    assert again["w"] is placed["w"]
    moved = put(placed, batch_sharding(mesh))  # another sharding: a reshard, same values
    assert moved["w"] is not placed["w"]
    np.testing.assert_array_equal(fetch(moved)["w"], 1.0)


def test_single_process_helpers_are_no_ops():
    x = np.arange(4)
    assert from_main(x) is x
    barrier("nothing to wait for")
    assert is_main_process()
