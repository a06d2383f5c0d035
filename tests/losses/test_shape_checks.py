"""Losses check the shapes of the arrays they are given (chex, at trace time, free under jit).

``B == T`` below, so a ``[T]`` mask where ``[B, T]`` belongs, a ``[B]`` one, or a ``[B, 1]``
input against ``[B]`` ones would broadcast without any error (the last to ``[B, B]``); each case
ran silently (or failed with an unrelated error) before its check.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax.losses import (
    bradley_terry_loss,
    clipped_surrogate,
    dpo_loss,
    entropy_bonus,
    forward_kl_distill_loss,
    grpo_loss,
    gspo_loss,
    jsd_distill_loss,
    ppo_policy_loss,
    sft_loss,
    simpo_loss,
    value_loss,
)

B = T = 3
V = 5
CHEX = r"^\[Chex\] Assertion assert_\w+ failed"


def f32(*shape):
    return np.zeros(shape, np.float32)


def ones(*shape):
    return np.ones(shape, np.float32)


BT = f32(B, T)
CASES = {
    "sft_loss mask [T]": lambda: sft_loss(BT, ones(T)),
    "sft_loss mask [B, 1]": lambda: sft_loss(BT, ones(B, 1)),
    "clipped_surrogate old_logp [B, 1]": lambda: clipped_surrogate(
        BT, f32(B, 1), BT, ones(B, T), clip_eps_low=0.2),
    "ppo_policy_loss old_logp [T]": lambda: ppo_policy_loss(BT, f32(T), BT, ones(B, T)),
    "ppo_policy_loss advantages [1, T]": lambda: ppo_policy_loss(BT, BT, f32(1, T), ones(B, T)),
    "ppo_policy_loss mask [B]": lambda: ppo_policy_loss(BT, BT, f32(B), ones(B)),
    "value_loss old_values [B, 1]": lambda: value_loss(BT, f32(B, 1), BT, ones(B, T)),
    "value_loss returns [T]": lambda: value_loss(BT, BT, f32(T), ones(B, T)),
    "entropy_bonus mask [T]": lambda: entropy_bonus(BT, ones(T), coef=0.01),
    "grpo_loss ref_logp [B, 1]": lambda: grpo_loss(
        BT, BT, f32(B), ones(B, T), ref_logp=f32(B, 1), kl_coef=0.1),
    "grpo_loss advantages [B, 1]": lambda: grpo_loss(BT, None, f32(B, 1), ones(B, T)),
    "gspo_loss advantages [B, T]": lambda: gspo_loss(BT, BT, BT, ones(B, T)),
    "gspo_loss old_logp [T]": lambda: gspo_loss(BT, f32(T), f32(B), ones(B, T)),
    "dpo_loss ref_chosen [B, 1]": lambda: dpo_loss(f32(B), f32(B), f32(B, 1), f32(B), beta=0.1),
    "dpo_loss pair_mask [1]": lambda: dpo_loss(f32(B), f32(B), f32(B), f32(B), beta=0.1,
                                               pair_mask=ones(1)),
    "simpo_loss lengths [B, 1]": lambda: simpo_loss(f32(B), f32(B), ones(B, 1), ones(B)),
    "bradley_terry_loss rejected [B, 1]": lambda: bradley_terry_loss(f32(B), f32(B, 1)),
    "bradley_terry_loss margin [1]": lambda: bradley_terry_loss(f32(B), f32(B), margin=f32(1)),
    "forward_kl_distill_loss teacher [B, 1, V]": lambda: forward_kl_distill_loss(
        f32(B, T, V), f32(B, 1, V), ones(B, T)),
    "jsd_distill_loss mask [T]": lambda: jsd_distill_loss(f32(B, T, V), f32(B, T, V), ones(T)),
}


@pytest.mark.parametrize("case", CASES)
def test_mismatched_shape_is_an_error(case):
    with pytest.raises(AssertionError, match=CHEX):
        CASES[case]()


def test_shape_checks_run_at_trace_time_under_jit():
    with pytest.raises(AssertionError, match=CHEX):
        jax.jit(sft_loss)(BT, ones(T))
    with pytest.raises(AssertionError, match=CHEX):
        jax.jit(lambda *a: ppo_policy_loss(*a))(BT, f32(B, 1), BT, ones(B, T))
