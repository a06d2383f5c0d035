"""Metric sinks: where the training loop's rows go, and ``LoggingConfig``, which picks them.

``metrics.jsonl`` (``JsonlSink``) is always written: the run's own record, truncated to the
checkpoint on resume, read by the plots and the tests. Everything else is borrowed plumbing:
TensorBoard event files come from ``tensorboardX`` (a dependency); Weights & Biases, trackio
and MLflow are optional trackers, each off unless ``LoggingConfig`` names it and each behind a
setup extra (``pip install 'rlhf_jax[wandb]'``, ``[trackio]``, ``[mlflow]``). A configured
tracker whose package is missing is an error when the config is built, before anything runs.

Trackers receive the scalars tagged ``split/name`` (``train/loss``, ``eval/loss``) and the run's
config (``hparams``) as their config or parameters. Only process 0 opens any sink (the loop
decides); ``close(ok)`` tells a tracker whether the run ended normally or with an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import pathlib
import time
import urllib.parse
from typing import Any, Mapping

_TRACKERS = ("wandb", "trackio", "mlflow")  # the module name is also the setup extra's


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Where metrics go besides ``metrics.jsonl`` (always written)."""

    progress: bool = True
    """Show a progress bar (stderr) with the loss, key metrics, tokens/s and ETA."""
    console: bool = True
    """Print every evaluation's metrics to stderr (training metrics are on the progress bar)."""
    tensorboard: bool = True
    """Write TensorBoard event files (tensorboardX) to ``<run_dir>/tensorboard``."""
    wandb: str | None = None
    """Weights & Biases project to log to (``pip install 'rlhf_jax[wandb]'``); None: off."""
    wandb_mode: str = "offline"
    """W&B mode: "offline" writes a local run directory under ``<run_dir>/wandb`` (``wandb sync``
    uploads it later); "online" streams to the W&B server (after ``wandb login``)."""
    trackio: str | None = None
    """trackio project, stored locally under ``$TRACKIO_DIR`` (``pip install
    'rlhf_jax[trackio]'``); None: off."""
    mlflow: str | None = None
    """MLflow tracking URI (e.g. ``http://host:5000``) or a local directory for MLflow's file
    store, e.g. ``mlruns`` (``pip install 'rlhf_jax[mlflow]'``: the mlflow-skinny client; a
    database URI needs the full ``mlflow``); None: off. Experiment: ``$MLFLOW_EXPERIMENT_NAME``,
    else "rlhf_jax"."""
    run_name: str | None = None
    """The run's name in the trackers (default: the run directory's name)."""

    def __post_init__(self):
        if self.wandb_mode not in ("online", "offline"):
            raise ValueError(f"wandb_mode must be 'online' or 'offline', got {self.wandb_mode!r}")
        for name in _TRACKERS + ("run_name",):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"LoggingConfig.{name} must be a non-empty string or None, "
                                 f"got {value!r}")
        for name in _TRACKERS:
            if getattr(self, name) is not None and importlib.util.find_spec(name) is None:
                raise _missing(name)


def _missing(module: str) -> ImportError:
    return ImportError(f"LoggingConfig.{module} is set, but the {module!r} package is not "
                       f"installed: pip install 'rlhf_jax[{module}]' (or set {module}=None)")


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == module:
            raise _missing(module) from e
        raise


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, str)}


class JsonlSink:
    """One JSON object per line: ``{"step": s, "time": t, "split": "train", ...metrics}``."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row |= {k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        self._f.write(json.dumps(row, allow_nan=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl_metrics(path: str) -> list[dict]:
    """The rows a ``JsonlSink`` wrote (for plots and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TensorBoardSink:
    """Scalars as ``events.out.tfevents.*`` in ``directory``, via ``tensorboardX``.

    Non-finite values are dropped (TensorBoard cannot chart them; ``metrics.jsonl`` keeps
    them). ``purge_step``: a resumed run passes its first new step, and TensorBoard hides what
    an interrupted invocation logged from that step on (it is logged again).
    """

    def __init__(self, directory: str, *, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        # One file per writer, named in time order: tensorboardX's default name has one-second
        # resolution, and a second writer in the same second would overwrite the first's file.
        self._writer = SummaryWriter(logdir=directory, purge_step=purge_step,
                                     filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for tag, value in _scalars(metrics).items():
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self, ok: bool = True) -> None:
        del ok
        self._writer.close()


class WandbSink:
    """A Weights & Biases run (``mode="offline"``: a local directory under ``directory/wandb``
    that ``wandb sync`` uploads later; nothing leaves the machine)."""

    def __init__(self, project: str, *, directory: str, name: str, mode: str = "offline",
                 config: Mapping[str, Any] | None = None):
        wandb = _require("wandb")
        os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(project=project, name=name, dir=directory, mode=mode,
                               config=dict(config or {}), settings=wandb.Settings(silent=True))
        self.dir = self._run.dir  # <directory>/wandb/<offline-run-...>/files

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(_scalars(metrics), step=step)

    def close(self, ok: bool = True) -> None:
        self._run.finish(exit_code=0 if ok else 1)


class TrackioSink:
    """A trackio run (local-first: a SQLite database per project under ``$TRACKIO_DIR``). A
    resumed invocation with the same name continues the same run."""

    def __init__(self, project: str, *, name: str, config: Mapping[str, Any] | None = None):
        self._trackio = _require("trackio")
        self._run = self._trackio.init(project=project, name=name, config=dict(config or {}),
                                       resume="allow")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(_scalars(metrics), step=step)

    def close(self, ok: bool = True) -> None:
        del ok
        self._trackio.finish()


class MlflowSink:
    """An MLflow run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default "rlhf_jax").

    ``target`` is a tracking URI, or a local directory used as MLflow's file store; MLflow 3
    keeps that store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set to
    true here unless the environment already says otherwise. ``config`` becomes the run's
    parameters, flattened to dotted keys.
    """

    def __init__(self, target: str, *, name: str, config: Mapping[str, Any] | None = None):
        _require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = target
        if len(urllib.parse.urlparse(target).scheme) <= 1:  # no scheme (or a drive letter)
            os.makedirs(target, exist_ok=True)
            uri = pathlib.Path(target).absolute().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlhf_jax"
        found = self._client.get_experiment_by_name(experiment)
        eid = found.experiment_id if found else self._client.create_experiment(experiment)
        self.run_id = self._client.create_run(eid, run_name=name).info.run_id
        params = [Param(k, v[:500]) for k, v in _flatten(config or {}).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=params[i:i + 100])

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, step) for k, v in _scalars(metrics).items()])

    def close(self, ok: bool = True) -> None:
        self._client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


def open_trackers(logging: LoggingConfig, run_dir: str, *,
                  hparams: Mapping[str, Any] | None = None, start: int = 0) -> list:
    """The sinks ``logging`` enables besides ``metrics.jsonl``, opened for a run in ``run_dir``
    that resumes at step ``start``. Each has ``write(step, {tag: value})`` and ``close(ok)``."""
    name = logging.run_name or os.path.basename(os.path.abspath(run_dir))
    makers = []
    if logging.tensorboard:
        makers.append(lambda: TensorBoardSink(os.path.join(run_dir, "tensorboard"),
                                              purge_step=start + 1 if start else None))
    if logging.wandb is not None:
        makers.append(lambda: WandbSink(logging.wandb, directory=run_dir, name=name,
                                        mode=logging.wandb_mode, config=hparams))
    if logging.trackio is not None:
        makers.append(lambda: TrackioSink(logging.trackio, name=name, config=hparams))
    if logging.mlflow is not None:
        makers.append(lambda: MlflowSink(logging.mlflow, name=name, config=hparams))
    opened = []
    try:
        for make in makers:
            opened.append(make())
    except BaseException:
        for sink in opened:
            sink.close(ok=False)
        raise
    return opened
