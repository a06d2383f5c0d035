"""Checks every pipeline run must pass: outputs written, metrics finite, parameters moved."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.train import read_jsonl_metrics
from rlhf_jax.types import is_glossary_metric


def flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def train_rows(run_dir: str) -> list[dict]:
    return [r for r in read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r["split"] == "train"]


def assert_run_outputs(result: dict, *, steps: int, kind: str) -> list[dict]:
    """result.json, config.json, metrics.jsonl (one finite row per step, every name in the
    metric glossary), TensorBoard events, the last step's checkpoint and ``plots/train.png``;
    returns the train rows."""
    run_dir = result["run_dir"]
    with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["steps"] == steps and result["steps"] == steps
    assert saved["complete"] is True and result["complete"] is True
    assert saved["model_dir"] == result["model_dir"]
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["kind"] == kind
    rows = read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
    for row in rows:
        for k, v in row.items():
            if k not in ("split", "step", "time"):
                assert math.isfinite(v), f"{k}={v} at step {row['step']}"
                # every pipeline logs by the one glossary, train and eval rows alike
                assert is_glossary_metric(k), f"{k!r} ({row['split']}) is not in types.METRICS"
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(r["update_skipped"] == 0.0 for r in train)
    tb = os.path.join(run_dir, "tensorboard")
    events = [f for f in os.listdir(tb) if f.startswith("events.out.tfevents.")]
    assert events and all(os.path.getsize(os.path.join(tb, f)) > 0 for f in events)
    assert str(steps) in os.listdir(os.path.join(run_dir, "checkpoints"))
    plot = os.path.join(run_dir, "plots", "train.png")  # drawn by finish_run (train.plots)
    assert result["plots"][0] == plot and read_bytes(plot)[:8] == b"\x89PNG\r\n\x1a\n"
    return train


def assert_moved(model_dir: str, initial, *, heads: tuple[str, ...]) -> None:
    """The exported model loads, is finite, has ``initial``'s leaves, and at least one moved."""
    _, params = load_hf_checkpoint(model_dir, heads=heads)
    new, old = flat(params), flat(initial)
    assert new.keys() == old.keys()
    for k, v in new.items():
        assert v.shape == old[k].shape and np.all(np.isfinite(v)), k
    moved = [k for k in new if not np.array_equal(new[k], old[k])]
    assert moved, "no parameter changed"


def assert_unchanged(model_dir: str, initial, *, heads: tuple[str, ...]) -> None:
    _, params = load_hf_checkpoint(model_dir, heads=heads)
    new, old = flat(params), flat(initial)
    assert new.keys() == old.keys()
    for k in new:
        np.testing.assert_array_equal(new[k], old[k], err_msg=k)


def assert_states_equal(a, b) -> None:
    """Bitwise equality of two TrainStates (params, optimizer and algorithm state, step, key)."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
