"""Tests of rlhf_jax/train/adapters.py: the trainer's LoRA split. The compiled train step
differentiates the adapter only (no weight gradient of a frozen matrix in its program), the
frozen base is bitwise unchanged after training, the adapter-off reference equals the base
model, and the merged export equals the LoRA forward."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.models import LoraConfig, ModelConfig, init_model, token_batch_logprobs
from rlhf_jax.train import create_train_state, make_train_step
from rlhf_jax.train.adapters import TRAINED_HEADS, adapt, lora_loss
from rlhf_jax.types import TokenBatch

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=2,
                  num_heads=4, num_kv_heads=2, heads=("lm", "reward"))
LORA = LoraConfig(rank=4, alpha=8.0)


def _batch(b=3, t=10, seed=0) -> TokenBatch:  # 30 tokens: no kernel has a dimension of 30
    r = np.random.default_rng(seed)
    tokens = r.integers(0, CFG.vocab_size, size=(b, t)).astype(np.int32)
    ones = np.ones((b, t), bool)
    return TokenBatch(tokens, ones, ones, np.zeros((b, t), np.int32),
                      np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy())


def _nll(model):
    def loss(params, batch, key):
        del key
        lp = token_batch_logprobs(model, params, batch)
        m = batch.loss_mask.astype(jnp.float32)
        return -jnp.sum(lp * m), jnp.sum(m), {}
    return loss


@pytest.fixture(scope="module")
def toy():
    return init_model(CFG, jax.random.PRNGKey(0))


def _dot_shapes(hlo: str) -> set[tuple[int, ...]]:
    return {tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} dot\(", hlo)}


def test_trainable_tree_is_adapter_plus_new_heads(toy):
    model, params = toy
    adapted, trainable = adapt(model, params, LORA, jax.random.PRNGKey(1))
    assert set(trainable) == {"layers", "reward_head"} and "reward_head" in TRAINED_HEADS
    assert "reward_head" not in adapted.base and "embed" in adapted.base
    leaves = jax.tree_util.tree_leaves_with_path(trainable["layers"])
    assert all(str(p[-1].key) in ("lora_a", "lora_b") for p, _ in leaves)


def test_train_step_has_no_frozen_weight_gradient_and_leaves_the_base_bitwise(toy):
    model, params = toy
    adapted, trainable = adapt(model, params, LORA, jax.random.PRNGKey(1))
    before = jax.tree.map(np.array, adapted.base)
    opt = optax.adamw(1e-2)
    loss = lora_loss(_nll(adapted.model), adapted, has_frozen=False, train=True)
    step = make_train_step(loss, opt, frozen=adapted.base)
    state = create_train_state(jax.tree.map(jnp.copy, trainable), opt, seed=0)  # donated
    for i in range(3):
        state, m = step(state, _batch(seed=i))
    assert float(m["loss"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, adapted.base), before)
    # the compiled gradient: no dot whose output has a frozen kernel's shape (or its transpose)
    frozen = {tuple(x.shape) for x in jax.tree.leaves(adapted.base) if x.ndim == 2}
    frozen |= {s[::-1] for s in frozen}
    hlo = jax.jit(jax.grad(lambda tr: loss(tr, _batch(), jax.random.PRNGKey(0),
                                           adapted.base)[0])).lower(trainable).compile()
    assert not frozen & _dot_shapes(hlo.as_text()), frozen & _dot_shapes(hlo.as_text())
    full = jax.jit(jax.grad(lambda p: _nll(model)(p, _batch(), None)[0])).lower(params).compile()
    assert frozen & _dot_shapes(full.as_text())  # the check sees weight gradients when they exist


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_reference_is_the_base_with_the_adapter_off(toy, quantize):
    model, params = toy
    lora = LoraConfig(rank=4, alpha=8.0, quantize_base=quantize)
    adapted, trainable = adapt(model, params, lora, jax.random.PRNGKey(1))
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)  # a trained adapter
    ref_model, params_of = adapted.reference
    got = token_batch_logprobs(ref_model, params_of(adapted.base), _batch())
    if quantize is None:  # the plain base model on the very same arrays
        want = token_batch_logprobs(model, params, _batch())
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:  # the quantised base with B = 0: the policy's starting point exactly
        fresh = adapt(model, params, lora, jax.random.PRNGKey(1))[1]
        want = token_batch_logprobs(adapted.model, adapted.join(fresh), _batch())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    trained = token_batch_logprobs(adapted.model, adapted.join(trainable), _batch())
    assert np.abs(np.asarray(trained) - np.asarray(got)).max() > 1e-3


def test_merged_export_equals_the_lora_forward(toy):
    model, params = toy
    adapted, trainable = adapt(model, params, LORA, jax.random.PRNGKey(1))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    lora_lp = token_batch_logprobs(adapted.model, adapted.join(trainable), _batch())
    merged = adapted.merged(trainable)
    assert np.asarray(merged["reward_head"]["kernel"]).shape == (CFG.hidden_size, 1)
    merged_lp = token_batch_logprobs(model, merged, _batch())
    np.testing.assert_allclose(np.asarray(merged_lp), np.asarray(lora_lp), atol=2e-5)
