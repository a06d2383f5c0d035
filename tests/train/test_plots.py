"""``train.plots``: the panels a run's plots hold, the files ``plot_run`` writes (valid PNGs,
written atomically, only on process 0), and the experiments' ``plot_curves`` / ``plot_xy``."""

from __future__ import annotations

import json
import math
import os

import pytest

from rlhf_jax.train import plots
from rlhf_jax.types import is_glossary_metric

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TRAIN = [{"step": s, "time": 0.0, "split": "train", "loss": 1.0 / s, "policy_loss": -0.1 * s,
          "reward": 0.1 * s, "rewards/reward_model": 0.2 * s, "rewards/correct": 0.5,
          "kl": 0.01 * s, "kl_coef": 0.1, "entropy": 2.0 - 0.1 * s, "grad_norm": 1.5,
          "count": 32.0, "policy/clip_frac": 0.1, "note": "text is never plotted"}
         for s in range(1, 6)]
EVAL = [{"step": s, "time": 0.0, "split": "eval", "rewards/gold": 0.3, "kl": 0.02 * s,
         "response_length": 12.0} for s in (0, 5)]


def write_metrics(run_dir, rows) -> str:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=True) + "\n" for r in rows)
    return str(run_dir)


def assert_png(path) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, f"{path}: {len(data)} bytes"


def test_plot_groups_are_glossary_names():
    for _, keys in plots.PLOT_GROUPS:
        for key in keys:
            assert is_glossary_metric(key.replace("<name>", "any")), key


def test_run_plot_keys_only_present_metrics_in_group_order():
    assert plots.run_plot_keys(TRAIN) == [
        "loss", "policy_loss", "reward", "rewards/correct", "rewards/reward_model", "kl",
        "kl_coef", "entropy", "grad_norm"]
    assert plots.run_plot_keys(EVAL) == ["rewards/gold", "kl", "response_length"]
    pairs = [{"step": 1, "split": "eval", "loss": 0.6, "rewards/accuracy": 0.7,
              "rewards/margin": 0.3, "rewards/chosen": 0.2, "rewards/rejected": -0.1,
              "rewards/mean": 0.05, "learning_rate": 1e-3}]
    # preference statistics are their own group, not reward components
    assert plots.run_plot_keys(pairs) == ["loss", "rewards/accuracy", "rewards/margin",
                                          "rewards/chosen", "rewards/rejected", "rewards/mean",
                                          "learning_rate"]
    assert plots.run_plot_keys([]) == []
    assert plots.run_plot_keys([{"step": 1, "loss": "nan as text", "kl": True}]) == []


def test_plot_run_writes_train_and_eval_pngs(tmp_path):
    run_dir = write_metrics(tmp_path / "ppo", TRAIN + EVAL)
    paths = plots.plot_run(run_dir)
    plot_dir = os.path.join(run_dir, "plots")
    assert paths == [os.path.join(plot_dir, "train.png"), os.path.join(plot_dir, "eval.png")]
    for p in paths:
        assert_png(p)
    assert sorted(os.listdir(plot_dir)) == ["eval.png", "train.png"]  # no temp file left


def test_plot_run_without_eval_rows_or_rows(tmp_path):
    run_dir = write_metrics(tmp_path / "sft", TRAIN)
    assert plots.plot_run(run_dir) == [os.path.join(run_dir, "plots", "train.png")]
    assert not os.path.exists(os.path.join(run_dir, "plots", "eval.png"))
    empty = write_metrics(tmp_path / "empty", [])
    assert plots.plot_run(empty) == []
    assert not os.path.exists(os.path.join(empty, "plots"))
    assert plots.plot_run(str(tmp_path / "no_such_run")) == []


def test_plot_run_survives_non_finite_values_and_stages(tmp_path):
    rows = [{"step": 1, "split": "train", "loss": math.nan, "kl": math.inf, "stage": "sft"},
            {"step": 2, "split": "train", "loss": math.nan, "kl": 0.5, "stage": "sft"},
            {"step": 1, "split": "train", "loss": 0.3, "stage": "dpo"}]
    run_dir = write_metrics(tmp_path / "combined", rows)
    (path,) = plots.plot_run(run_dir)
    assert_png(path)


def test_plot_run_replaces_old_plots_atomically(tmp_path):
    run_dir = write_metrics(tmp_path / "run", TRAIN)
    os.makedirs(os.path.join(run_dir, "plots"))
    old = os.path.join(run_dir, "plots", "train.png")
    with open(old, "wb") as f:
        f.write(b"stale")
    plots.plot_run(run_dir)
    assert_png(old)


def test_plot_run_refuses_a_plots_link_leaving_the_run(tmp_path):
    run_dir = write_metrics(tmp_path / "run", TRAIN)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(run_dir, "plots"))
    with pytest.raises(ValueError, match="outside the output directory"):
        plots.plot_run(run_dir)
    assert os.listdir(outside) == []


def test_plot_run_draws_only_on_process_zero(tmp_path, monkeypatch):
    run_dir = write_metrics(tmp_path / "run", TRAIN + EVAL)
    monkeypatch.setattr(plots, "is_main_process", lambda: False)
    assert plots.plot_run(run_dir) == []
    assert not os.path.exists(os.path.join(run_dir, "plots"))


def test_plot_curves_and_xy_write_pngs(tmp_path):
    a = plots.plot_curves(TRAIN + EVAL, ["loss", "kl"], str(tmp_path / "p" / "curves.png"),
                          split="train", title="t")
    b = plots.plot_xy({"x": ([0, 1], [1, 2]), "y": ([0, 1], [2, 1])},
                      str(tmp_path / "p" / "xy.png"), xlabel="kl", ylabel="gold")
    for p in (a, b):
        assert_png(p)
    assert sorted(os.listdir(tmp_path / "p")) == ["curves.png", "xy.png"]
