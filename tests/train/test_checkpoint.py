"""Tests of rlhf_jax/train/checkpoint.py: exact round trip (KL-controller state included), latest
step, retention, NaN never reaches disk, mismatched targets fail loudly naming the path."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.ops import KLControllerState, kl_controller_init
from rlhf_jax.train import Checkpointer, TrainState, create_train_state
from tests.train.common import assert_trees_bitwise, host, toy_params

META = {"data": {"pos": 12, "epoch": 1, "order": [3, 1, 2]}, "step": 5, "note": "ünïcode"}


def _state(seed=0, kl=0.123):
    opt = optax.adamw(1e-3)
    s = create_train_state(toy_params(seed), opt, seed=seed, algo=kl_controller_init(kl))
    # make every leaf distinctive (non-zero moments, odd step and skip count)
    mu = optax.tree_utils.tree_get(s.opt_state, "mu")
    s = s._replace(step=jnp.int32(5), skipped=jnp.int32(2),
                   opt_state=optax.tree_utils.tree_set(
                       s.opt_state, mu={k: v + 0.5 for k, v in mu.items()}))
    return s


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_round_trip_bitwise_with_kl_state_and_metadata(tmp_path):
    s = _state()
    expected = host(s)
    ck = Checkpointer(str(tmp_path), max_to_keep=3)
    assert ck.restore(None, s) is None
    ck.save(5, s, META, force=True)
    ck.wait()
    restored, meta = ck.restore(5, _state(seed=1, kl=9.0))  # a different-valued target
    ck.close()
    assert meta == META
    assert isinstance(restored, TrainState) and isinstance(restored.algo, KLControllerState)
    assert_trees_bitwise(restored, expected)
    assert float(restored.algo.kl_coef) == np.float32(0.123)


def test_restore_none_picks_latest_and_max_to_keep(tmp_path):
    ck = Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3, 4):
        ck.save(step, _state(kl=float(step)), {"step": step}, force=True)
    ck.wait()
    assert ck.latest_step() == 4
    assert ck.all_steps() == [3, 4]
    restored, meta = ck.restore(None, _state())
    assert meta == {"step": 4} and float(restored.algo.kl_coef) == 4.0
    restored, meta = ck.restore(3, _state())
    assert meta == {"step": 3} and float(restored.algo.kl_coef) == 3.0
    ck.close()
    # a new Checkpointer over the same directory sees the same steps
    ck2 = Checkpointer(str(tmp_path), max_to_keep=2)
    assert ck2.latest_step() == 4 and ck2.all_steps() == [3, 4]
    ck2.close()


def test_empty_directory_restores_none(tmp_path):
    ck = Checkpointer(str(tmp_path / "nothing_here"))
    assert ck.latest_step() is None and ck.all_steps() == []
    assert ck.restore(None, _state()) is None
    ck.close()


@pytest.mark.parametrize("where", ["params", "opt_state", "algo"])
def test_non_finite_state_is_refused_and_nothing_written(tmp_path, where):
    ck = Checkpointer(str(tmp_path), max_to_keep=3)
    good = _state()
    ck.save(1, good, {"step": 1}, force=True)
    ck.wait()
    before = _files(str(tmp_path))
    s = _state()
    if where == "params":
        s = s._replace(params={**s.params, "b": s.params["b"].at[1].set(jnp.nan)})
    elif where == "opt_state":
        nu = optax.tree_utils.tree_get(s.opt_state, "nu")
        s = s._replace(opt_state=optax.tree_utils.tree_set(
            s.opt_state, nu={**nu, "v": nu["v"].at[0].set(jnp.inf)}))
    else:
        s = s._replace(algo=KLControllerState(kl_coef=jnp.float32(jnp.nan)))
    with pytest.raises(FloatingPointError, match=f"step 2.*{where}"):
        ck.save(2, s, {"step": 2}, force=True)
    ck.wait()
    assert ck.all_steps() == [1] and _files(str(tmp_path)) == before
    restored, _ = ck.restore(None, good)
    assert_trees_bitwise(restored, host(_state()))
    ck.close()


@pytest.mark.parametrize("change, path", [
    (lambda s: s._replace(params={**s.params, "extra": jnp.zeros(2)}), "params.extra"),
    (lambda s: s._replace(params={k: v for k, v in s.params.items() if k != "v"}), "params.v"),
    (lambda s: s._replace(params={**s.params, "w": jnp.zeros((4, 2))}), "params.w"),
    (lambda s: s._replace(params={**s.params, "b": s.params["b"].astype(jnp.bfloat16)}),
     "params.b"),
    (lambda s: s._replace(algo=()), "algo.kl_coef"),
])
def test_mismatched_target_raises_naming_path(tmp_path, change, path):
    ck = Checkpointer(str(tmp_path))
    ck.save(1, _state(), {}, force=True)
    ck.wait()
    with pytest.raises(ValueError, match=r"does not match the expected state.*" + path):
        ck.restore(None, change(_state()))
    ck.close()
