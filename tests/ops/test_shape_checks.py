"""Public ops check their input shapes (chex, at trace time) instead of broadcasting them.

``B == T`` below, so a ``[T]`` array where ``[B]`` belongs (or the reverse) would broadcast
without any error; each case ran silently or failed deep inside a scan before its check.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax.ops import (
    aggregate_loss,
    chunked_entropy,
    chunked_logprobs_and_entropy,
    chunked_token_logprobs,
    discounted_returns,
    gae_advantages,
    generalized_jsd_from_logits,
    kl_from_logits,
    kl_k1,
    kl_k3,
    kl_k3_straight_through,
    reinforce_pp_advantages,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_logprobs,
    token_mean,
)

B = T = 3
V, D = 5, 4
CHEX = r"^\[Chex\] Assertion assert_\w+ failed"


def f32(*shape):
    return np.zeros(shape, np.float32)


def ids(*shape):
    return np.zeros(shape, np.int32)


CASES = {
    "token_logprobs targets [B, 1]": lambda: token_logprobs(f32(B, T, V), ids(B, 1)),
    "token_logprobs targets [T]": lambda: token_logprobs(f32(B, T, V), ids(T)),
    "chunked_token_logprobs targets [1, T]": lambda: chunked_token_logprobs(
        f32(B, T, D), f32(D, V), ids(1, T)),
    "chunked_logprobs_and_entropy targets [B]": lambda: chunked_logprobs_and_entropy(
        f32(B, T, D), f32(D, V), ids(B)),
    "chunked_entropy unembed [D + 1, V]": lambda: chunked_entropy(f32(B, T, D), f32(D + 1, V)),
    "chunked_entropy hidden [T, D]": lambda: chunked_entropy(f32(T, D), f32(D, V)),
    "kl_k1 ref_logp [B, 1]": lambda: kl_k1(f32(B, T), f32(B, 1)),
    "kl_k3 ref_logp [T]": lambda: kl_k3(f32(B, T), f32(T)),
    "kl_k3_straight_through logp [1, T]": lambda: kl_k3_straight_through(f32(1, T), f32(B, T)),
    "kl_from_logits q [B, 1, V]": lambda: kl_from_logits(f32(B, T, V), f32(B, 1, V)),
    "generalized_jsd_from_logits q [T, V]": lambda: generalized_jsd_from_logits(
        f32(B, T, V), f32(T, V)),
    "token_mean mask [T]": lambda: token_mean(f32(B, T), np.ones(T)),
    "seq_mean_token_mean mask [1, T]": lambda: seq_mean_token_mean(f32(B, T), np.ones((1, T))),
    "seq_mean_token_sum mask [B, 1]": lambda: seq_mean_token_sum(f32(B, T), np.ones((B, 1))),
    "seq_mean_token_sum_norm loss [T]": lambda: seq_mean_token_sum_norm(f32(T), np.ones(T)),
    "aggregate_loss mask [T]": lambda: aggregate_loss(f32(B, T), np.ones(T), mode="token_mean"),
    "discounted_returns mask [B]": lambda: discounted_returns(f32(B, T), np.ones(B), gamma=1.0),
    "discounted_returns bootstrap [B, 1]": lambda: discounted_returns(
        f32(B, T), np.ones((B, T)), gamma=1.0, bootstrap_value=f32(B, 1)),
    "gae_advantages values [1, T]": lambda: gae_advantages(
        f32(B, T), f32(1, T), np.ones((B, T)), gamma=1.0, lam=0.9),
    "gae_advantages bootstrap [B + 1]": lambda: gae_advantages(
        f32(B, T), f32(B, T), np.ones((B, T)), gamma=1.0, lam=0.9, bootstrap_value=f32(B + 1)),
    "reinforce_pp_advantages mask [T]": lambda: reinforce_pp_advantages(f32(B, T), np.ones(T)),
}


@pytest.mark.parametrize("case", CASES)
def test_mismatched_shape_is_an_error(case):
    with pytest.raises(AssertionError, match=CHEX):
        CASES[case]()


def test_shape_checks_run_at_trace_time_under_jit():
    with pytest.raises(AssertionError, match=CHEX):
        jax.jit(kl_k1)(f32(B, T), f32(B, 1))
    with pytest.raises(AssertionError, match=CHEX):
        jax.jit(lambda x, m: aggregate_loss(x, m, mode="seq_mean_token_mean"))(
            f32(B, T), np.ones(T))
