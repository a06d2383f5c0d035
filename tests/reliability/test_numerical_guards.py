"""Numerical guards at the pipeline level: an SFT step whose loss is NaN is skipped (logged as
``update_skipped = 1``, params and optimizer state untouched) and training goes on; K
consecutive skips stop the run with ``NonFiniteError`` naming K, the step and the last good
checkpoint; no checkpoint ever holds a non-finite value.

The step-level guarantee (bitwise-unchanged params and Adam state on a NaN gradient) is in
``tests/train/test_step.py``, the loop-level stop in ``tests/train/test_loop.py``; here the
poison travels through a real stage. It is a batch marked by its ``segment_ids`` (set to
``POISON``) whose token log-probs the patched ``sft.token_batch_logprobs`` turns into NaN, so
the loss, the gradient and the gradient norm are NaN on exactly that step.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import BatchIterator
from rlhf_jax.pipelines import sft
from rlhf_jax.pipelines.setup import load_model
from rlhf_jax.train import (Checkpointer, NonFiniteError, create_train_state, make_optimizer,
                            read_jsonl_metrics)
from tests.helpers import assert_all_finite
from tests.pipelines.common import flat
from tests.reliability.conftest import crash_sft_config

POISON = -7


def _poison(monkeypatch, bad_steps) -> None:
    """Batches served at the 0-based step indices ``bad_steps`` (a set, or an int: that index
    and all later ones) give a NaN loss."""
    is_bad = (lambda i: i >= bad_steps) if isinstance(bad_steps, int) else bad_steps.__contains__

    class PoisonedIterator(BatchIterator):
        def next(self):
            index = self.state()["batches"]
            batch = super().next()
            if is_bad(index):
                batch = batch._replace(segment_ids=np.full_like(batch.segment_ids, POISON))
            return batch

    real = sft.token_batch_logprobs

    def token_batch_logprobs(model, params, batch):
        lp = real(model, params, batch)
        return lp * jnp.where(jnp.any(batch.segment_ids == POISON), jnp.nan, 1.0)

    monkeypatch.setattr(sft, "BatchIterator", PoisonedIterator)
    monkeypatch.setattr(sft, "token_batch_logprobs", token_batch_logprobs)


def _target(cfg):
    """An abstract TrainState of the run (to restore its checkpoints into)."""
    _, params = load_model(cfg.model, heads=("lm",), vocab_size=512, seed=cfg.seed)
    return create_train_state(params, make_optimizer(cfg.optimizer, cfg.loop.total_steps),
                              seed=cfg.seed)


def _all_checkpoints(cfg) -> dict[int, object]:
    ck = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"))
    like = _target(cfg)
    out = {s: ck.restore(s, like)[0] for s in ck.all_steps()}
    ck.close()
    return out


def _train_rows(cfg) -> list[dict]:
    return [r for r in read_jsonl_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
            if r["split"] == "train"]


def test_nan_step_is_skipped_and_training_continues(world, tmp_path, monkeypatch):
    cfg = crash_sft_config(train_data=world.pref["sft"], tokenizer=world.tokenizer,
                           output_dir=str(tmp_path / "one_nan"), steps=6, save_every=1, keep=10)
    _poison(monkeypatch, {2})  # the third step
    result = sft.run(cfg)
    assert result["steps"] == 6
    rows = _train_rows(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["update_skipped"] for r in rows] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert math.isnan(rows[2]["loss"]) and math.isnan(rows[2]["grad_norm"])
    for r in rows[:2] + rows[3:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    states = _all_checkpoints(cfg)
    assert sorted(states) == [1, 2, 3, 4, 5, 6]
    for s, state in states.items():
        assert_all_finite(state, f"checkpoint {s}")  # NaN never reached disk
    # the skipped step changed neither params nor Adam moments, only the step and the counter
    assert int(states[3].step) == 3 and int(states[3].skipped) == 1
    assert int(states[4].skipped) == 0  # a good step resets the consecutive count
    for part in ("params", "opt_state"):
        a, b = flat(getattr(states[3], part)), flat(getattr(states[2], part))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{part}{k}")
    # ... and training went on: step 4 moved the params again
    a, b = flat(states[4].params), flat(states[3].params)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert_all_finite(result["state"], "final state")


def test_consecutive_nan_steps_stop_the_run(world, tmp_path, monkeypatch):
    cfg = crash_sft_config(train_data=world.pref["sft"], tokenizer=world.tokenizer,
                           output_dir=str(tmp_path / "all_nan"), steps=8, save_every=1, keep=10,
                           max_skips=2)
    _poison(monkeypatch, 2)  # every step from the third on
    with pytest.raises(NonFiniteError, match=r"^2 consecutive steps had non-finite gradients "
                                             r"\(last at step 4\); params were left unchanged\."
                                             r".*Last good checkpoint: 3$"):
        sft.run(cfg)
    rows = _train_rows(cfg)
    # the run stopped at the second bad step: its row was never logged, nothing after it ran
    assert [r["update_skipped"] for r in rows] == [0.0, 0.0, 1.0]
    with open(os.path.join(cfg.output_dir, "ledger.tsv"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 4
    states = _all_checkpoints(cfg)
    assert sorted(states) == [1, 2, 3]
    for s, state in states.items():
        assert_all_finite(state, f"checkpoint {s}")
    assert jax.tree.all(jax.tree.map(np.array_equal, states[3].params, states[2].params))
    assert not os.path.exists(os.path.join(cfg.output_dir, "model"))  # nothing exported
