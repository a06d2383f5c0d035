"""DPO (every loss of ``LOSSES``) and distillation (every loss of ``DISTILL_LOSSES``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rlhf_jax.data import Tokenizer
from rlhf_jax.losses import DISTILL_LOSSES, REFERENCE_FREE_LOSSES
from rlhf_jax.models import load_hf_checkpoint, sequence_logprob_sums
from rlhf_jax.pipelines import DataConfig, ModelSpec, OptimizerConfig, distill, dpo
from rlhf_jax.pipelines.datasets import load_pairs
from rlhf_jax.pipelines.setup import load_model
from tests.pipelines.common import assert_moved, assert_run_outputs
from tests.pipelines.conftest import LOG, TINY, loop

OPT = OptimizerConfig(learning_rate=1e-2, schedule="constant")

# At step 1 the policy is the reference, so every implicit reward margin h is 0 and the loss is
# its value at h = 0 (beta = 0.1, label_smoothing = 0.1).
LOSS_AT_REFERENCE = {"sigmoid": np.log(2.0), "cdpo": np.log(2.0), "robust": np.log(2.0),
                     "ipo": (1.0 / (2 * 0.1)) ** 2}


def dpo_config(world, name: str, **kw) -> dpo.DPOConfig:
    data = DataConfig(train=world.pref["preference"], max_prompt_length=24, max_length=48,
                      batch_size=8, on_overflow="truncate")
    base = dict(data=data, tokenizer=world.tokenizer,
                policy=ModelSpec(path=world.sft["model_dir"]),
                output_dir=os.path.join(world.root, name), optimizer=OPT, loop=loop(3),
                logging=LOG, mesh=None)
    return dpo.DPOConfig(**(base | kw))


@pytest.mark.parametrize("loss", sorted(dpo.LOSSES))
def test_dpo_loss_run(world, loss):
    result = dpo.run(dpo_config(world, f"dpo_{loss}",
                                algorithm=dpo.DPOAlgorithmConfig(loss=loss)))
    rows = assert_run_outputs(result, steps=3, kind="DPOConfig")
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert_moved(result["model_dir"], init, heads=("lm",))
    assert rows[0]["count"] == 8.0  # pairs per step
    if loss in LOSS_AT_REFERENCE:
        assert rows[0]["loss"] == pytest.approx(LOSS_AT_REFERENCE[loss], rel=1e-4)
    else:
        assert loss in REFERENCE_FREE_LOSSES
    assert rows[-1]["loss"] != rows[0]["loss"]


def test_dpo_reference_logps_equal_direct_computation(world):
    cfg = dpo_config(world, "unused")
    tok = Tokenizer.load(world.tokenizer)
    pairs = load_pairs(world.pref["preference_eval"], cfg.data, tok)  # 32 pairs
    model, params = load_model(ModelSpec(path=world.sft["model_dir"]), heads=("lm",),
                               vocab_size=tok.vocab_size, seed=0)
    chosen, rejected = dpo.reference_logps(model, params, pairs, batch_size=12)  # 12+12+8
    want_c, len_c = sequence_logprob_sums(model, params, pairs.chosen)
    want_r, len_r = sequence_logprob_sums(model, params, pairs.rejected)
    assert chosen.shape == rejected.shape == (32,)
    np.testing.assert_allclose(chosen, np.asarray(want_c), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(rejected, np.asarray(want_r), rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(len_c) > 0) and np.all(chosen < 0) and np.all(rejected < 0)
    assert not np.allclose(chosen, rejected)


def test_dpo_unknown_loss():
    with pytest.raises(ValueError, match="algorithm.loss must be one of"):
        dpo.DPOConfig(data=DataConfig(train="x"), tokenizer="y", output_dir="z",
                      policy=ModelSpec(), algorithm=dpo.DPOAlgorithmConfig(loss="kto"))


@pytest.mark.parametrize("loss", sorted(DISTILL_LOSSES))
def test_distill_loss_run(world, loss):
    cfg = distill.DistillConfig(
        data=DataConfig(train=world.pref["sft"], max_length=48, batch_size=8,
                        on_overflow="truncate"),
        tokenizer=world.tokenizer, teacher=ModelSpec(path=world.sft["model_dir"]),
        student=TINY, output_dir=os.path.join(world.root, f"distill_{loss}"),
        algorithm=distill.DistillAlgorithmConfig(loss=loss), optimizer=OPT, loop=loop(3),
        logging=LOG, mesh=None)
    result = distill.run(cfg)
    rows = assert_run_outputs(result, steps=3, kind="DistillConfig")
    _, init = load_model(TINY, heads=("lm",), vocab_size=512, seed=cfg.seed + 1)
    assert_moved(result["model_dir"], init, heads=("lm",))
    # a fresh student is far from the teacher: a positive divergence that training reduces
    assert rows[0]["loss"] > 0.0 and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_distill_unknown_loss():
    with pytest.raises(ValueError, match="algorithm.loss must be one of"):
        distill.DistillConfig(data=DataConfig(train="x"), tokenizer="y", output_dir="z",
                              teacher=ModelSpec(),
                              algorithm=distill.DistillAlgorithmConfig(loss="mse"))
