"""Every public pure function, jitted over a batch sharded on an 8-device mesh, equals the
single-device result.

Runs on 8 virtual CPU devices (``tests/conftest.py`` sets
``--xla_force_host_platform_device_count=8``). Arrays whose leading axis is the batch are
sharded along it with ``NamedSharding(mesh, P("data"))``; scalars are replicated. ``CASES`` must
name every public function of ``rlhf_jax.ops``, ``rlhf_jax.losses`` and
``rlhf_jax.models.scoring`` (checked below), so a new function cannot skip this test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import rlhf_jax.losses as L
import rlhf_jax.models.scoring as S
import rlhf_jax.ops as O
from rlhf_jax.models import get_preset, init_model
from rlhf_jax.types import TokenBatch
from tests.helpers import random_mask, right_padded_mask
from tests.test_coverage import public_functions

B, T, V, D, G = 16, 12, 24, 8, 4


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    f = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    mask = random_mask(r, B, T, empty_rows=1, single_rows=1)
    return {
        "logits": f(B, T, V), "logits2": f(B, T, V), "targets": r.integers(0, V, (B, T)),
        "hidden": f(B, T, D), "unembed": f(D, V), "x": f(B, T), "mask": mask,
        "logp": -np.abs(f(B, T)), "old_logp": -np.abs(f(B, T)), "ref_logp": -np.abs(f(B, T)),
        "adv": f(B, T), "adv_seq": f(B), "rewards": f(B), "values": f(B, T), "returns": f(B, T),
        "tokens": r.integers(0, 6, (B, T)), "seq": -np.abs(f(B)) * 10, "seq2": -np.abs(f(B)) * 10,
        "seq3": -np.abs(f(B)) * 10, "seq4": -np.abs(f(B)) * 10,
        "lengths": r.integers(1, T, B).astype(np.float32), "lengths2": r.integers(1, T, B).astype(
            np.float32), "pad_mask": right_padded_mask(r, B, T, min_len=1),
    }


def _mean(x):
    return O.Mean(total=jnp.sum(x), count=jnp.asarray(x.size, jnp.float32))


# name -> (function of the input dict, names of its batch-sharded inputs)
CASES = {
    "token_logprobs": lambda a: O.token_logprobs(a["logits"], a["targets"], temperature=0.7),
    "truncated_importance_weights": lambda a: O.truncated_importance_weights(
        a["logp"], a["old_logp"], a["mask"], cap=1.5),
    "entropy_from_logits": lambda a: O.entropy_from_logits(a["logits"]),
    "chunked_token_logprobs": lambda a: O.chunked_token_logprobs(
        a["hidden"], a["unembed"], a["targets"], chunk_t=5, chunk_v=7),
    "chunked_entropy": lambda a: O.chunked_entropy(a["hidden"], a["unembed"], chunk_t=5, chunk_v=7),
    "chunked_logprobs_and_entropy": lambda a: O.chunked_logprobs_and_entropy(
        a["hidden"], a["unembed"], a["targets"], temperature=0.9, chunk_t=5, chunk_v=7),
    "masked_sum": lambda a: O.masked_sum(a["x"], a["mask"]),
    "masked_count": lambda a: O.masked_count(a["mask"], axis=-1),
    "masked_mean": lambda a: O.masked_mean(a["x"], a["mask"]),
    "masked_var": lambda a: O.masked_var(a["x"], a["mask"], axis=-1),
    "masked_whiten": lambda a: O.masked_whiten(a["x"], a["mask"]),
    "completion_mask_from_eos": lambda a: O.completion_mask_from_eos(a["tokens"], eos_ids=(0, 1)),
    "is_truncated": lambda a: O.is_truncated(a["tokens"], eos_ids=0),
    "last_token_index": lambda a: O.last_token_index(a["mask"]),
    "kl_k1": lambda a: O.kl_k1(a["logp"], a["ref_logp"]),
    "kl_k2": lambda a: O.kl_k2(a["logp"], a["ref_logp"]),
    "kl_k3": lambda a: O.kl_k3(a["logp"], a["ref_logp"]),
    "kl_k3_straight_through": lambda a: O.kl_k3_straight_through(a["logp"], a["ref_logp"]),
    "kl_from_logits": lambda a: O.kl_from_logits(a["logits"], a["logits2"]),
    "generalized_jsd_from_logits": lambda a: O.generalized_jsd_from_logits(
        a["logits"], a["logits2"], beta=0.3),
    "kl_controller_init": lambda a: O.kl_controller_init(0.05),
    "fixed_kl_update": lambda a: O.fixed_kl_update(
        O.kl_controller_init(0.05), observed_kl=O.masked_mean(a["x"], a["mask"]), n_steps=8),
    "adaptive_kl_update": lambda a: O.adaptive_kl_update(
        O.kl_controller_init(0.05), observed_kl=jnp.abs(O.masked_mean(a["x"], a["mask"])) * 9,
        n_steps=8, target=6.0, horizon=100.0),
    "discounted_returns": lambda a: O.discounted_returns(
        a["x"], a["mask"], gamma=0.9, bootstrap_value=a["rewards"]),
    "gae_advantages": lambda a: O.gae_advantages(
        a["x"], a["values"], a["mask"], gamma=0.99, lam=0.95, bootstrap_value=a["rewards"]),
    "group_advantages": lambda a: O.group_advantages(a["rewards"], group_size=G),
    "rloo_advantages": lambda a: O.rloo_advantages(a["rewards"], group_size=G),
    "reinforce_pp_advantages": lambda a: O.reinforce_pp_advantages(a["x"], a["mask"], gamma=1.0),
    "token_mean": lambda a: O.token_mean(a["x"], a["mask"]),
    "seq_mean_token_mean": lambda a: O.seq_mean_token_mean(a["x"], a["mask"]),
    "seq_mean_token_sum": lambda a: O.seq_mean_token_sum(a["x"], a["mask"]),
    "seq_mean_token_sum_norm": lambda a: O.seq_mean_token_sum_norm(a["x"], a["mask"],
                                                                   max_tokens=32),
    "aggregate_loss": lambda a: O.aggregate_loss(a["x"], a["mask"], mode="seq_mean_token_mean"),
    "safe_divide": lambda a: O.safe_divide(*O.token_mean(a["x"], a["mask"])),
    "merge_metrics": lambda a: O.merge_metrics({"m": _mean(a["x"])}, {"m": _mean(a["values"])}),
    "compute_metrics": lambda a: O.compute_metrics({"m": _mean(a["x"]), "v": O.ExplainedVariance.of(
        a["x"], a["values"], a["mask"])}),
    "sft_loss": lambda a: L.sft_loss(a["logp"], a["mask"]),
    "bradley_terry_loss": lambda a: L.bradley_terry_loss(
        a["seq"], a["seq2"], margin=a["lengths"] * 0.1, center_coef=0.01),
    "clipped_surrogate": lambda a: L.clipped_surrogate(
        a["logp"], a["old_logp"], a["adv"], a["mask"], clip_eps_low=0.2, dual_clip=3.0),
    "ppo_policy_loss": lambda a: L.ppo_policy_loss(
        a["logp"], a["old_logp"], a["adv"], a["mask"], clip_eps_high=0.28, dual_clip=3.0),
    "value_loss": lambda a: L.value_loss(a["values"], a["x"], a["returns"], a["mask"]),
    "entropy_bonus": lambda a: L.entropy_bonus(-a["logp"], a["mask"], coef=0.01),
    "grpo_loss": lambda a: L.grpo_loss(
        a["logp"], a["old_logp"], a["adv_seq"], a["mask"], ref_logp=a["ref_logp"], kl_coef=0.04),
    "gspo_loss": lambda a: L.gspo_loss(
        a["logp"], a["old_logp"], a["adv_seq"], a["pad_mask"], ref_logp=a["ref_logp"],
        kl_coef=0.04, clip_eps_low=0.2, clip_eps_high=0.3),
    "dpo_loss": lambda a: L.dpo_loss(a["seq"], a["seq2"], a["seq3"], a["seq4"], beta=0.1),
    "cdpo_loss": lambda a: L.cdpo_loss(a["seq"], a["seq2"], a["seq3"], a["seq4"]),
    "robust_dpo_loss": lambda a: L.robust_dpo_loss(a["seq"], a["seq2"], a["seq3"], a["seq4"]),
    "ipo_loss": lambda a: L.ipo_loss(a["seq"], a["seq2"], a["seq3"], a["seq4"], beta=0.5),
    "simpo_loss": lambda a: L.simpo_loss(a["seq"], a["seq2"], a["lengths"], a["lengths2"]),
    "orpo_loss": lambda a: L.orpo_loss(a["seq"], a["seq2"], a["lengths"], a["lengths2"]),
    "forward_kl_distill_loss": lambda a: L.forward_kl_distill_loss(
        a["logits"], a["logits2"], a["mask"], temperature=2.0),
    "reverse_kl_distill_loss": lambda a: L.reverse_kl_distill_loss(
        a["logits"], a["logits2"], a["mask"]),
    "jsd_distill_loss": lambda a: L.jsd_distill_loss(
        a["logits"], a["logits2"], a["mask"], beta=0.7, aggregation="seq_mean_token_mean"),
}


MODEL, PARAMS = init_model(get_preset(
    "toy-1m", vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
    num_kv_heads=1, heads=("lm", "value", "reward")), jax.random.PRNGKey(0))
P_LEN = 5  # prompt columns of the token array; the rest is the completion


def _token_batch(a) -> TokenBatch:
    m = a["pad_mask"].astype(bool)
    return TokenBatch(a["tokens"] * m, m & (jnp.arange(T) > 0), m, m.astype(jnp.int32),
                      jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0))


def _rollout(a):
    return (a["tokens"][:, :P_LEN], jnp.ones((B, P_LEN), bool), a["tokens"][:, P_LEN:],
            a["pad_mask"][:, P_LEN:].astype(bool))


CASES |= {
    "token_batch_logprobs": lambda a: S.token_batch_logprobs(MODEL, PARAMS, _token_batch(a),
                                                             temperature=0.7),
    "token_batch_logits": lambda a: S.token_batch_logits(MODEL, PARAMS, _token_batch(a)),
    "sequence_logprob_sums": lambda a: S.sequence_logprob_sums(MODEL, PARAMS, _token_batch(a)),
    "token_batch_rewards": lambda a: S.token_batch_rewards(MODEL, PARAMS, _token_batch(a)),
    "score_completions": lambda a: S.score_completions(MODEL, PARAMS, *_rollout(a),
                                                       entropy=True, values=True),
    "completion_values": lambda a: S.completion_values(MODEL, PARAMS, *_rollout(a)),
    "sequence_rewards": lambda a: S.sequence_rewards(MODEL, PARAMS, *_rollout(a)),
}


@functools.lru_cache(maxsize=1)
def _mesh() -> Mesh:
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.asarray(devices[:8]), ("data",))


def _shard(a: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    mesh = _mesh()
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    return {k: jax.device_put(v, batch if v.shape[:1] == (B,) else replicated)
            for k, v in a.items()}


def test_every_public_function_has_a_sharding_case():
    assert set(public_functions()) == set(CASES), (
        f"missing: {sorted(set(public_functions()) - set(CASES))}; "
        f"stale: {sorted(set(CASES) - set(public_functions()))}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_jit_equals_single_device(name):
    fn = CASES[name]
    host = _inputs()
    single = jax.jit(fn)(jax.device_put(host, jax.devices()[0]))
    sharded_in = _shard(host)
    assert sharded_in["x"].sharding.num_devices == 8
    sharded = jax.jit(fn)(sharded_in)
    flat_s, tree_s = jax.tree.flatten(single)
    flat_m, tree_m = jax.tree.flatten(sharded)
    assert tree_s == tree_m
    assert flat_s, "case returned nothing"
    for a, b in zip(flat_s, flat_m):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6,
                                   err_msg=name)
        assert np.all(np.isfinite(np.asarray(a))), name
