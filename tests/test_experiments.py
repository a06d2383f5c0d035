"""Every experiment module runs end to end on a tiny configuration and writes what it promises.

The main job runs as the README runs it (``python -m experiments.rlhf_pipeline``, with CLI
overrides that shrink it); the others are called in-process through ``get_config()`` and
``run(cfg)``. Learning outcomes at full size are measured by the experiments themselves (see the
README), not here: these tests check the plumbing, the artifacts and that every number is finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                  num_kv_heads=1, mesh="none")  # one device: meshes are tests/pipelines' work
TINY_WORLD = dict(n_sft=64, n_pref=64, n_prompts=32, n_eval_prompts=16, sft_steps=4,
                  sft_batch_size=8, rm_steps=3, rm_batch_size=8, max_new_tokens=6, **TINY_MODEL)
TINY_PPO = dict(ppo_steps=2, rollout_batch_size=8, num_minibatches=2, eval_every=1)


def _finite_metrics(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert rows, path
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (path, r["step"], k, v)
    return rows


def test_main_job_writes_every_artifact(tmp_path):
    args = [a for k, v in (TINY_WORLD | TINY_PPO).items() for a in (f"--{k}", str(v))]
    proc = subprocess.run([sys.executable, "-m", "experiments.rlhf_pipeline", "--name", "smoke",
                           "--runs-root", str(tmp_path), "--win-rate-samples", "1", *args],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "smoke"
    for name in ("experiment_config.json", "metrics.jsonl", "summary.md",
                 "samples_before.jsonl", "samples_after.jsonl", "tokenizer/tokenizer.json",
                 "plots/ppo_rewards_kl.png", "plots/gold_vs_kl.png", "plots/ppo_train.png",
                 "plots/sft_loss.png", "plots/reward_model.png"):
        assert (run / name).is_file(), name
    for stage in ("sft", "reward_model", "ppo"):
        assert (run / stage / "config.json").is_file()
        assert any((run / stage / "tensorboard").iterdir())
        assert (run / stage / "model" / "model.safetensors").is_file()
        assert os.listdir(run / stage / "checkpoints")
        _finite_metrics(run / stage / "metrics.jsonl")
    rows = _finite_metrics(run / "metrics.jsonl")
    assert {r["stage"] for r in rows} == {"sft", "reward_model", "ppo"}
    evals = [r for r in rows if r["stage"] == "ppo" and r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]  # baseline, then every step
    assert evals[0]["kl"] == 0.0  # the step-0 policy is the reference
    assert "rewards/gold" in evals[-1]
    summary = (run / "summary.md").read_text()
    assert "PPO win rate vs SFT on gold" in summary and "RM held-out accuracy" in summary
    assert "train" in proc.stderr  # the progress bar


def _run(module, tmp_path, **overrides):
    mod = __import__(f"experiments.{module}", fromlist=["run"])
    cfg = dataclasses.replace(mod.get_config(), runs_root=str(tmp_path), **overrides)
    return mod.run(cfg)


def test_dpo_preference_runs(tmp_path):
    out = _run("dpo_preference", tmp_path, dpo_steps=3, dpo_batch_size=8, win_rate_samples=1,
               **TINY_WORLD)
    o = out["outcome"]
    assert 0.0 <= o["DPO win rate vs SFT on gold"] <= 1.0
    assert math.isfinite(o["KL(DPO || SFT) per sequence"])  # k1 Monte-Carlo: may dip below 0
    assert (pathlib.Path(out["run_dir"]) / "plots" / "dpo.png").is_file()


def test_grpo_arithmetic_runs(tmp_path):
    out = _run("grpo_arithmetic", tmp_path, n_sft=64, n_train=32, n_eval=16, sft_steps=4,
               grpo_steps=2, prompts_per_step=4, group_size=2, eval_every=1, max_new_tokens=4,
               **TINY_MODEL)
    assert set(out["before"]) == set(out["after"]) and len(out["before"]) == 4
    assert all(0.0 <= v <= 1.0 for v in [*out["before"].values(), *out["after"].values()])
    rows = _finite_metrics(pathlib.Path(out["run_dir"]) / "grpo" / "metrics.jsonl")
    assert any("rewards/exact_match" in r for r in rows)


def test_distill_runs(tmp_path):
    out = _run("distill", tmp_path, student_steps=3, student_batch_size=8,
               student_hidden_size=16, student_layers=1, samples_per_prompt=2, **TINY_WORLD)
    for k in ("distilled", "sft"):
        assert out[k]["forward_kl"] >= 0 and math.isfinite(out[k]["reverse_kl"])


def test_best_of_n_runs(tmp_path):
    out = _run("best_of_n", tmp_path, n=4, **TINY_WORLD)
    assert [p["n"] for p in out["points"]] == [1, 2, 4]
    assert out["points"][0]["kl_bound"] == 0.0
    # selecting by the proxy can only raise the proxy of the selection, on the same samples
    assert out["dataset"]["reward_model/best_mean"] >= out["dataset"]["reward_model/sample_mean"]
    rows = [json.loads(x) for x in open(out["dataset"]["output"], encoding="utf-8")]
    assert len(rows) == 32 and all({"prompt", "completion"} <= r.keys() for r in rows)


@pytest.mark.slow  # a study built on stages the default run covers
def test_overoptimization_runs(tmp_path):
    out = _run("overoptimization", tmp_path, bon_max_n=4, **TINY_WORLD, **TINY_PPO)
    assert [p["n"] for p in out["best_of_n"]] == [1, 4]
    assert len(out["ppo_eval"]) == 3


@pytest.mark.slow  # a study built on stages the default run covers
def test_kl_frontier_runs(tmp_path):
    out = _run("kl_frontier", tmp_path, ppo_kl_coefs="0.1", dpo_betas="0.1", dpo_steps=2,
               dpo_batch_size=8, report_samples=1, **TINY_WORLD, **TINY_PPO)
    assert [(m, s) for m, s, _, _ in out["points"]] == [("PPO", 0.1), ("DPO", 0.1)]
    assert all(math.isfinite(kl) and math.isfinite(g) for _, _, kl, g in out["points"])


@pytest.mark.parametrize("module", ["rlhf_pipeline", "grpo_arithmetic", "dpo_preference",
                                    "distill", "best_of_n", "overoptimization", "kl_frontier"])
def test_cli_help_lists_options(module, monkeypatch, capsys):
    """``python -m experiments.MODULE --help``, run in this process (``runpy`` executes the
    module as ``__main__``, as ``-m`` does; ``test_main_job_writes_every_artifact`` launches one
    in a fresh interpreter)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [f"experiments/{module}.py", "--help"])
    monkeypatch.delitem(sys.modules, f"experiments.{module}", raising=False)  # as -m finds it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(f"experiments.{module}", run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--runs-root" in out and "--seed" in out


def test_cli_rejects_unknown_and_badly_typed_options(tmp_path):
    """tyro parses each value by its field's type: a typo or a wrong type stops before any
    work, naming the option."""
    from experiments import _cli, rlhf_pipeline

    base = rlhf_pipeline.get_config()
    cfg = _cli.parse(base, ["--ppo-steps", "7", "--kl_coef", "0.5", "--mesh", "none"])
    assert (cfg.ppo_steps, cfg.kl_coef, cfg.mesh) == (7, 0.5, "none")
    assert dataclasses.replace(cfg, ppo_steps=base.ppo_steps, kl_coef=base.kl_coef,
                               mesh=base.mesh) == base
    for argv in (["--ppo-step", "7"], ["--ppo-steps", "seven"]):
        with pytest.raises(SystemExit):
            _cli.parse(base, argv)


@pytest.mark.parametrize("module, argv, message", [
    ("grpo_arithmetic", ["--variant", "foo"], "algorithm.variant must be one of"),
    ("grpo_arithmetic", ["--temperature", "-1"], "sampling.temperature must be >= 0"),
    ("dpo_preference", ["--loss", "dpo2"], "algorithm.loss must be one of")])
def test_a_later_stage_option_is_checked_before_the_first_stage(module, argv, message, capsys):
    """A bad option of a later stage stops the experiment while its config is parsed, not
    after the earlier stages have trained."""
    import importlib

    from experiments import _cli

    mod = importlib.import_module(f"experiments.{module}")
    with pytest.raises(SystemExit):
        _cli.parse(mod.get_config(), argv)
    assert message in capsys.readouterr().err


def test_a_stage_stopped_by_sigterm_ends_the_chain():
    """A stage that a SIGTERM stopped before its last step has saved its checkpoint; the next
    stage must not start from its partial model: the experiment exits, asking for a rerun."""
    from experiments import _common as common

    done = {"run_dir": "runs/x/sft", "steps": 400, "complete": True}
    assert common.completed(done) is done
    with pytest.raises(SystemExit, match=r"runs/x/sft: stopped at step 37 by SIGTERM.*resume"):
        common.completed({"run_dir": "runs/x/sft", "steps": 37, "complete": False})
    timer = common.Timer()
    with pytest.raises(SystemExit, match="stopped at step 2"):
        timer("sft", lambda: {"run_dir": "d", "steps": 2, "complete": False})
    assert "sft" in timer.times
    assert timer("bon", lambda: {"output": "x"}) == {"output": "x"}  # not a training stage
