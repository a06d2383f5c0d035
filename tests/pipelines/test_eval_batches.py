"""Evaluation covers every row: the last batch is filled with rows that carry no loss tokens, so
an evaluation in batches equals the evaluation of the whole set in one batch (RELIABILITY: an
evaluation set that does not divide into batches, or is smaller than one, loses no rows)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax.data import pad_token_batch, preference_batch
from rlhf_jax.losses import sft_loss
from rlhf_jax.models import get_preset, init_model, token_batch_logprobs
from rlhf_jax.pipelines.datasets import fixed_batches
from rlhf_jax.pipelines.dpo import DPOAlgorithmConfig, make_dpo_loss
from rlhf_jax.pipelines.reward_model import make_reward_loss
from rlhf_jax.train import evaluate
from rlhf_jax.train.step import make_eval_step

RNG = np.random.default_rng(0)


def _model(heads):
    cfg = get_preset("toy-1m", vocab_size=64, heads=heads, hidden_size=32,
                     intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    return init_model(cfg, jax.random.PRNGKey(1))


def _pairs(n):
    items = [([1, *RNG.integers(5, 60, 3).tolist()], RNG.integers(5, 60, 4).tolist() + [2],
              RNG.integers(5, 60, 2).tolist() + [2]) for _ in range(n)]
    return preference_batch(items, length=16, pad_id=0)


def _eval(loss_fn, params, data, batch_size):
    step = make_eval_step(loss_fn)
    return evaluate(step, params, fixed_batches(data, batch_size), jax.random.PRNGKey(0))


@pytest.mark.parametrize("batch_size", [2, 4, 8])
def test_reward_model_eval_in_batches_equals_one_batch(batch_size):
    model, params = _model(("reward",))
    data = _pairs(5)
    loss_fn = make_reward_loss(model)
    whole, parts = _eval(loss_fn, params, data, 5), _eval(loss_fn, params, data, batch_size)
    assert whole.keys() == parts.keys()
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_eval_in_batches_equals_one_batch(loss):
    model, params = _model(("lm",))
    pairs = _pairs(3)
    ref = (RNG.normal(size=3).astype(np.float32) - 5, RNG.normal(size=3).astype(np.float32) - 5)
    loss_fn = make_dpo_loss(model, DPOAlgorithmConfig(loss=loss))
    whole = _eval(loss_fn, params, (pairs, *ref), 3)
    parts = _eval(loss_fn, params, (pairs, *ref), 2)
    for k in whole:
        assert parts[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), k


def test_token_loss_eval_in_batches_equals_one_batch_and_fill_rows_add_nothing():
    model, params = _model(("lm",))
    items = [([1, *RNG.integers(5, 60, k).tolist(), 2], [0] + [1] * (k + 1)) for k in (3, 5, 2)]
    data = pad_token_batch(items, length=16, pad_id=0)

    def loss_fn(p, batch, key):
        return sft_loss(token_batch_logprobs(model, p, batch), batch.loss_mask)

    batches = fixed_batches(data, 2)
    assert len(batches) == 2 and not np.asarray(batches[1].loss_mask)[1].any()
    assert _eval(loss_fn, params, data, 2)["loss"] == pytest.approx(
        _eval(loss_fn, params, data, 3)["loss"], rel=1e-6)
    assert len(fixed_batches(data, 8)) == 1  # a set smaller than one batch is evaluated too
