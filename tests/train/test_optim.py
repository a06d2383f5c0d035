"""Tests of rlhf_jax/train/optim.py: schedules against hand values, config checks, clipping and
weight decay wired into the AdamW chain."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.train import (SCHEDULES, OptimizerConfig, check_schedule, make_optimizer,
                            make_schedule)


def _values(cfg, total_steps, steps):
    sched = make_schedule(cfg, total_steps)
    return np.array([float(sched(s)) for s in steps])


def test_schedule_table_matches_validation():
    assert set(SCHEDULES) == {"constant", "linear", "cosine"}
    for name in SCHEDULES:  # every table entry is accepted by the config
        OptimizerConfig(schedule=name)


def test_constant_with_warmup_hand():
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=4)
    np.testing.assert_allclose(_values(cfg, 10, [0, 1, 2, 3, 4, 7, 10, 50]),
                               [0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1], rtol=1e-6)


def test_constant_no_warmup_hand():
    cfg = OptimizerConfig(learning_rate=3e-4, schedule="constant")
    np.testing.assert_allclose(_values(cfg, 5, [0, 4, 9]), [3e-4] * 3, rtol=1e-6)


def test_linear_with_warmup_hand():
    # warmup 0 -> 0.1 over 2 steps, then 0.1 -> 0.01 over the 10 remaining steps
    cfg = OptimizerConfig(learning_rate=0.1, schedule="linear", warmup_steps=2, min_lr_ratio=0.1)
    np.testing.assert_allclose(_values(cfg, 12, [0, 1, 2, 3, 7, 12, 20]),
                               [0.0, 0.05, 0.1, 0.091, 0.055, 0.01, 0.01], rtol=1e-5)


def test_cosine_no_warmup_hand():
    # 0.2 * ((1 - 0.25) * 0.5 * (1 + cos(pi t / 10)) + 0.25)
    cfg = OptimizerConfig(learning_rate=0.2, schedule="cosine", min_lr_ratio=0.25)
    np.testing.assert_allclose(_values(cfg, 10, [0, 2, 5, 10, 15]),
                               [0.2, 0.18567627, 0.125, 0.05, 0.05], rtol=1e-5)


def test_cosine_with_warmup_hand():
    cfg = OptimizerConfig(learning_rate=0.2, schedule="cosine", warmup_steps=5, min_lr_ratio=0.25)
    np.testing.assert_allclose(_values(cfg, 15, [0, 1, 4, 5, 7, 10, 15, 30]),
                               [0.0, 0.04, 0.16, 0.2, 0.18567627, 0.125, 0.05, 0.05], rtol=1e-5)


def test_warmup_equal_to_total_hand():
    cfg = OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.5)
    np.testing.assert_allclose(_values(cfg, 4, [0, 2, 4]), [0.0, 0.5, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(schedule="exponential"), "schedule must be one of"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(learning_rate=float("inf")), "learning_rate"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**bad)


def test_warmup_longer_than_the_run_is_refused():
    """The schedule's length is the run's (``LoopConfig.total_steps``), so the warmup is checked
    against it where both are known: ``check_schedule`` (called by every stage config) and the
    factories themselves."""
    cfg = OptimizerConfig(warmup_steps=11)
    msg = ("optimizer.warmup_steps 11 exceeds the run's loop.total_steps 10; lower "
           "warmup_steps")
    for fn in (check_schedule, make_schedule, make_optimizer):
        with pytest.raises(ValueError) as err:
            fn(cfg, 10)
        assert str(err.value) == msg, fn
    check_schedule(cfg, 11)  # equal is fine (see test_warmup_equal_to_total_hand)


def test_config_is_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        OptimizerConfig(1e-3)  # type: ignore[misc]
    cfg = OptimizerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0  # type: ignore[misc]


def _first_moment(cfg, grad):
    """AdamW's first moment after one update: ``(1 - b1) * (gradient after clipping)``."""
    opt = make_optimizer(cfg, 10)
    params = {"a": jnp.zeros(2)}
    state = opt.init(params)
    _, state = opt.update({"a": jnp.asarray(grad, jnp.float32)}, state, params)
    return np.asarray(optax.tree_utils.tree_get(state, "mu")["a"])


def test_clipping_scales_huge_gradient_to_max_norm():
    cfg = OptimizerConfig(schedule="constant", max_grad_norm=1.0, b1=0.9)
    # [3e6, 4e6] has norm 5e6: clipped to [0.6, 0.8]; the first moment is 0.1 times that
    np.testing.assert_allclose(_first_moment(cfg, [3e6, 4e6]), [0.06, 0.08], rtol=1e-6)


def test_clipping_leaves_small_gradient_alone():
    cfg = OptimizerConfig(schedule="constant", max_grad_norm=1.0, b1=0.9)
    np.testing.assert_allclose(_first_moment(cfg, [0.3, 0.4]), [0.03, 0.04], rtol=1e-6)


def test_no_clipping_when_max_grad_norm_none():
    cfg = OptimizerConfig(schedule="constant", max_grad_norm=None, b1=0.9)
    np.testing.assert_allclose(_first_moment(cfg, [3e6, 4e6]), [3e5, 4e5], rtol=1e-6)


def test_decoupled_weight_decay_uses_schedule_hand():
    # zero gradient: AdamW's update is -lr * wd * p = -0.1 * 0.5 * p
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5)
    opt = make_optimizer(cfg, 10)
    params = {"a": jnp.array([2.0, -4.0])}
    updates, _ = opt.update({"a": jnp.zeros(2)}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["a"]), [-0.1, 0.2], rtol=1e-6)


def test_first_update_uses_warmup_value_zero():
    """Warmup starts at 0: the very first update is exactly zero (documents the convention)."""
    cfg = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=2)
    opt = make_optimizer(cfg, 4)
    params = {"a": jnp.array([1.0, 2.0])}
    state = opt.init(params)
    u0, state = opt.update({"a": jnp.array([1.0, -1.0])}, state, params)
    u1, _ = opt.update({"a": jnp.array([1.0, -1.0])}, state, params)
    np.testing.assert_array_equal(np.asarray(u0["a"]), [0.0, 0.0])
    np.testing.assert_allclose(np.asarray(u1["a"]), [-0.05, 0.05], rtol=1e-4)
