"""Tests of rlhf_jax/train/state.py and rlhf_jax/parallel/mesh.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.ops import kl_controller_init
from rlhf_jax.parallel import batch_sharding, data_parallel_mesh, replicated
from rlhf_jax.train import TrainState, create_train_state, step_key
from tests.train.common import assert_trees_bitwise, host, toy_params


def test_create_train_state_fields():
    opt = optax.adam(1e-3)
    params = toy_params()
    s = create_train_state(params, opt, seed=3, algo=kl_controller_init(0.5))
    assert isinstance(s, TrainState)
    assert s.step.dtype == jnp.int32 and int(s.step) == 0
    assert s.skipped.dtype == jnp.int32 and int(s.skipped) == 0
    np.testing.assert_array_equal(np.asarray(s.rng), np.asarray(jax.random.PRNGKey(3)))
    assert float(s.algo.kl_coef) == 0.5
    assert_trees_bitwise(s.params, host(toy_params()))
    assert_trees_bitwise(s.opt_state, host(opt.init(toy_params())))
    assert create_train_state(toy_params(), opt, seed=0).algo == ()


def test_step_key_is_fold_in_of_step():
    opt = optax.sgd(0.1)
    s = create_train_state(toy_params(), opt, seed=11)
    keys = []
    for t in (0, 1, 2, 7, 1000):
        st = s._replace(step=jnp.int32(t))
        want = jax.random.fold_in(jax.random.PRNGKey(11), t)
        np.testing.assert_array_equal(np.asarray(step_key(st)), np.asarray(want))
        keys.append(tuple(np.asarray(step_key(st))))
    assert len(set(keys)) == 5
    # the base key never changes, so a resumed state at step t has the same key
    np.testing.assert_array_equal(np.asarray(jax.jit(step_key)(s._replace(step=jnp.int32(7)))),
                                  np.asarray(jax.random.fold_in(jax.random.PRNGKey(11), 7)))


def test_data_parallel_mesh_over_8_devices():
    mesh = data_parallel_mesh()
    assert mesh.axis_names == ("data",)
    assert dict(mesh.shape) == {"data": 8}
    assert list(mesh.devices) == jax.local_devices()
    small = data_parallel_mesh(jax.local_devices()[:2])
    assert dict(small.shape) == {"data": 2}


def test_batch_sharding_splits_leading_axis():
    mesh = data_parallel_mesh()
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    y = jax.device_put(x, batch_sharding(mesh))
    shards = sorted(y.addressable_shards, key=lambda sh: sh.index[0].start)
    assert len(shards) == 8
    for i, sh in enumerate(shards):
        assert sh.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(sh.data), x[2 * i:2 * i + 2])
    assert len({sh.device for sh in shards}) == 8
    np.testing.assert_array_equal(np.asarray(y), x)


def test_replicated_copies_whole_array():
    mesh = data_parallel_mesh()
    x = np.arange(6, dtype=np.float32)
    y = jax.device_put(x, replicated(mesh))
    assert len(y.addressable_shards) == 8
    for sh in y.addressable_shards:
        np.testing.assert_array_equal(np.asarray(sh.data), x)
