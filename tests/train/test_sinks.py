"""Tests of rlhf_jax/train/sinks.py. Every sink runs for real in its local mode and is read back
by its own library's reader: TensorBoard's ``EventAccumulator``, W&B's ``wandb leet inspect``,
``MlflowClient``, trackio's ``SQLiteStorage``. JSONL round trip; ``LoggingConfig`` checks."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.train import JsonlSink, LoggingConfig, TensorBoardSink, read_jsonl_metrics
from rlhf_jax.train.sinks import MlflowSink, TrackioSink, WandbSink
from tests.train.common import read_scalars

HPARAMS = {"seed": 3, "optimizer": {"learning_rate": 0.001, "schedule": "cosine"},
           "train": "data/train.jsonl"}
ROWS = [(0, {"eval/loss": 2.5}),  # what the loop sends: eval at start, train and eval rows
        (2, {"train/loss": 1.25, "train/grad_norm": float("nan")}),
        (2, {"eval/loss": 1.5}),
        (4, {"train/loss": np.float32(0.75), "train/grad_norm": 0.5})]


def _write(sink, ok=True):
    for step, metrics in ROWS:
        sink.write(step, metrics)
    sink.close(ok=ok)


def test_tensorboard_scalars_read_back(tmp_path):
    sink = TensorBoardSink(str(tmp_path / "tb"))
    sink.write(1, {"train/loss": 0.25, "train/lr": 1e-3})
    sink.write(2, {"train/loss": float("nan"), "train/acc": 0.5, "x": float("inf")})
    sink.write(300, {"eval/loss": np.float32(-1.75)})
    sink.close()
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(files) == 1
    assert read_scalars(files[0]) == {
        "train/loss": [(1, 0.25)],  # step 2's NaN is dropped (TensorBoard cannot chart it)
        "train/lr": [(1, np.float32(1e-3))],  # stored as float32
        "train/acc": [(2, 0.5)],
        "eval/loss": [(300, -1.75)]}


def test_tensorboard_resume_purges_what_the_interrupted_writer_logged(tmp_path):
    """Two writers in the same second get two files (in order); the second, opened by a run
    resumed at step 2, hides the first's rows from step 3 on."""
    first = TensorBoardSink(str(tmp_path))
    for step in (1, 2, 3, 4):
        first.write(step, {"train/loss": float(step)})
    first.close()
    second = TensorBoardSink(str(tmp_path), purge_step=3)
    for step in (3, 4, 5):
        second.write(step, {"train/loss": 10.0 * step})
    second.close()
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2
    assert read_scalars(str(tmp_path)) == {
        "train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]}


def test_jsonl_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "metrics.jsonl")
    sink = JsonlSink(path)
    sink.write(1, {"split": "train", "loss": np.float32(0.5), "count": 17})
    sink.write(2, {"split": "eval", "loss": float("nan"), "acc": 1.0})
    sink.close()
    sink = JsonlSink(path)  # appends (a resumed run keeps the earlier rows)
    sink.write(3, {"split": "train", "loss": 0.125})
    sink.close()
    rows = read_jsonl_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["split"] for r in rows] == ["train", "eval", "train"]
    assert rows[0]["loss"] == 0.5 and rows[0]["count"] == 17.0
    assert math.isnan(rows[1]["loss"]) and rows[1]["acc"] == 1.0
    assert rows[2]["loss"] == 0.125
    assert all(isinstance(r["time"], float) for r in rows)


@pytest.mark.parametrize("bad", [dict(wandb_mode="shared"), dict(wandb=""), dict(mlflow=" "),
                                 dict(trackio=3), dict(run_name="")])
def test_logging_config_validation(bad):
    with pytest.raises(ValueError):
        LoggingConfig(**bad)


@pytest.mark.parametrize("module", ["wandb", "trackio", "mlflow"])
def test_missing_tracker_package_names_the_extra(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # how Python spells "not importable"
    with pytest.raises(ImportError, match=rf"pip install 'rlhf_jax\[{module}\]'"):
        LoggingConfig(**{module: "proj"})
    sink = {"wandb": WandbSink, "trackio": TrackioSink, "mlflow": MlflowSink}[module]
    with pytest.raises(ImportError, match=rf"pip install 'rlhf_jax\[{module}\]'"):
        sink("proj", name="r", **({"directory": "unused"} if module == "wandb" else {}))


def _wandb_inspect(path: str, *flags: str) -> str:
    """W&B's own reader of a run's ``.wandb`` log (``wandb leet inspect``)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags,
                          path], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def test_wandb_offline_run_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var))  # nothing outside tmp_path
    sink = WandbSink("proj", directory=str(tmp_path), name="my-run", config=HPARAMS)
    _write(sink)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and sink.dir.startswith(runs[0])
    summary = json.loads(_wandb_inspect(runs[0], "--summary"))
    assert (summary["project"], summary["name"], summary["state"]) == ("proj", "my-run",
                                                                       "finished")
    assert summary["config"] == HPARAMS
    assert {k: v for k, v in summary["summary"].items() if not k.startswith("_")} == {
        "eval/loss": 1.5, "train/loss": 0.75, "train/grad_norm": 0.5}  # the last values
    history = [json.loads(line)["history"] for line in _wandb_inspect(runs[0]).splitlines()
               if '"type":"history"' in line.replace(" ", "")]
    rows = {h["step"].get("num", 0): {k: v for k, v in h["item"].items() if "/" in k}
            for h in history}
    assert rows == {0: {"eval/loss": 2.5},
                    2: {"train/loss": 1.25, "train/grad_norm": "NaN", "eval/loss": 1.5},
                    4: {"train/loss": 0.75, "train/grad_norm": 0.5}}


def test_mlflow_file_store_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "rlhf_jax_tests")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so the undo removes the
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")      # opt-in the sink itself sets
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    sink = MlflowSink(str(store), name="my-run", config=HPARAMS)
    _write(sink, ok=False)
    client = MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(sink.run_id)
    assert (run.info.run_name, run.info.status) == ("my-run", "FAILED")  # close(ok=False)
    assert client.get_experiment(run.info.experiment_id).name == "rlhf_jax_tests"
    assert run.data.params == {"seed": "3", "optimizer.learning_rate": "0.001",
                               "optimizer.schedule": "cosine", "train": "data/train.jsonl"}

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(sink.run_id, key)]

    assert history("train/loss") == [(2, 1.25), (4, 0.75)]
    assert history("eval/loss") == [(0, 2.5), (2, 1.5)]
    nan_step, later = history("train/grad_norm")
    assert nan_step[0] == 2 and math.isnan(nan_step[1]) and later == (4, 0.5)


_TRACKIO_CHILD = """
import json, sys
import trackio
from rlhf_jax.train.sinks import TrackioSink
sys.path.insert(0, sys.argv[1])
from tests.train.test_sinks import HPARAMS, _write
for _ in range(2):  # a resumed invocation with the same name continues the same run
    _write(TrackioSink("proj", name="my-run", config=HPARAMS))
logs = trackio.SQLiteStorage.get_logs("proj", "my-run")
print(json.dumps({"runs": trackio.SQLiteStorage.get_runs("proj"), "logs": logs,
                  "config": trackio.SQLiteStorage.get_run_config("proj", "my-run")}))
"""


def test_trackio_local_run_reads_back(tmp_path):
    """In a child process: trackio reads ``$TRACKIO_DIR`` once, when it is imported."""
    pytest.importorskip("trackio")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = os.environ | {"TRACKIO_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _TRACKIO_CHILD, repo], capture_output=True,
                         text=True, timeout=300, env=env, check=True, cwd=repo)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.exists(tmp_path / "proj.db")
    assert got["runs"] == ["my-run"]
    assert {k: v for k, v in got["config"].items() if not k.startswith("_")} == HPARAMS
    rows = [(r["step"], {k: v for k, v in r.items() if "/" in k}) for r in got["logs"]]
    expected = [(s, {k: float(v) for k, v in m.items()}) for s, m in ROWS]
    assert len(rows) == 2 * len(expected)
    for (step, metrics), (want_step, want) in zip(rows, expected * 2):
        assert step == want_step and metrics.keys() == want.keys()
        for k in want:
            assert metrics[k] == want[k] or (math.isnan(want[k]) and math.isnan(metrics[k]))
