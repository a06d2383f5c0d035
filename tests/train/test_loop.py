"""Tests of rlhf_jax/train/loop.py: exact resume (after a clean stop, a crash and SIGTERM) with
an equal batch ledger, metric rows and event files, eval rows, the non-finite stop (read at the
loop's sync points only) and a tracker fed the run's rows and hyper-parameters."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import signal

import jax
import numpy as np
import pytest

from rlhf_jax.ops import kl_controller_init
from rlhf_jax.train import (
    Checkpointer,
    LoggingConfig,
    LoopConfig,
    NonFiniteError,
    OptimizerConfig,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    read_jsonl_metrics,
)
from rlhf_jax.train import loop
from tests.helpers import assert_all_finite
from tests.train.common import (
    ArraySource,
    assert_trees_bitwise,
    host,
    read_scalars,
    toy_batch,
    toy_loss,
    toy_params,
)

N = 6  # 12 rows, 4 per batch: epochs end after steps 3 and 6
OPT = make_optimizer(OptimizerConfig(learning_rate=5e-2, schedule="cosine", warmup_steps=1), N)
STEP = make_train_step(toy_loss, OPT, micro_batches=2)  # compiled once, shared by the tests
_EVAL = make_eval_step(toy_loss)
_EVAL_BATCH = toy_batch(99, counts=[5, 4, 3, 2, 1, 0, 5, 5])


def fresh_state():
    return create_train_state(toy_params(), OPT, seed=0, algo=kl_controller_init(0.1))


def eval_fn(state):
    total, count, _ = _EVAL(state.params, _EVAL_BATCH, jax.random.PRNGKey(0))
    return {"loss": float(total) / float(count)}


def cfg(total, **kw):
    return LoopConfig(**({"total_steps": total, "log_every": 2, "eval_every": 3} | kw))


LOG = LoggingConfig(progress=False)  # TensorBoard and the console on: both are checked


def train_loop(config, **kw):
    """``loop.train_loop`` with this file's sinks (``logging=`` overrides them)."""
    return loop.train_loop(config, **({"logging": LOG} | kw))


def _ledger(run_dir):
    with open(os.path.join(run_dir, "ledger.tsv")) as f:
        return f.read()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run of N steps."""
    run_dir = str(tmp_path_factory.mktemp("straight"))
    data = ArraySource()
    state, rows = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                             data=data, eval_fn=eval_fn, tokens_in=lambda b: int(b["m"].sum()))
    return run_dir, host(state), rows, data.state()


def _assert_same_run(run_dir, state, data, straight):
    ref_dir, ref_state, ref_rows, ref_data = straight
    assert_trees_bitwise(state, ref_state)  # params, opt_state, step, rng, algo, skipped
    assert _ledger(run_dir) == _ledger(ref_dir)
    assert data.state() == ref_data


def test_straight_run_rows_ledger_and_events(straight):
    run_dir, state, rows, data_state = straight
    assert int(state.step) == N and data_state == {"pos": 12, "epoch": 1, "handed": N}
    lines = _ledger(run_dir).splitlines()
    assert [int(ln.split("\t")[0]) for ln in lines] == list(range(N))
    assert len({ln.split("\t")[1] for ln in lines}) == N  # six different batches
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]  # step 0: eval_at_start's baseline
    for r in train:
        assert math.isfinite(r["loss"]) and r["update_skipped"] == 0.0
        assert r["tokens_per_s"] > 0 and {"grad_norm", "count", "mse", "max_err"} <= r.keys()
    assert evals[-1]["loss"] == pytest.approx(eval_fn(state)["loss"], rel=1e-6)
    assert evals[0]["loss"] == eval_fn(fresh_state())["loss"]  # the baseline is the initial state
    assert evals[-1]["loss"] < evals[1]["loss"] < evals[0]["loss"]  # it learns
    disk = read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in disk] == [(r["step"], r["split"]) for r in rows]
    for r, d in zip(rows, disk):
        assert d["loss"] == pytest.approx(r["loss"], rel=1e-12)
    events = glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    scalars = read_scalars(events[0])  # TensorBoard's own reader: float32 copies of the rows
    for split, rs in (("train", train), ("eval", evals)):
        assert scalars[f"{split}/loss"] == [(r["step"], np.float32(r["loss"])) for r in rs]
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ckpt.all_steps() == [N]
    ckpt.close()


def test_resume_after_clean_stop_is_bitwise(straight, tmp_path):
    run_dir = str(tmp_path)
    first, _ = train_loop(cfg(4), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                          data=ArraySource(), eval_fn=eval_fn)
    assert int(first.step) == 4
    data = ArraySource()  # fresh source and fresh state: everything comes from the checkpoint
    state, rows = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                             data=data, eval_fn=eval_fn)
    _assert_same_run(run_dir, state, data, straight)
    # the second invocation logs steps 4..5 only, with the same values as the straight run
    ref = {(r["step"], r["split"]): r["loss"] for r in straight[2]}
    assert [(r["step"], r["split"]) for r in rows] == [(6, "train"), (6, "eval")]
    for r in rows:
        assert r["loss"] == ref[(r["step"], r["split"])]
    disk = read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in disk] == [
        (0, "eval"), (2, "train"), (3, "eval"), (4, "train"), (4, "eval"), (6, "train"),
        (6, "eval")]  # step 0: the baseline eval of a fresh run (not repeated on resume)
    assert all(math.isfinite(r["loss"]) for r in disk)
    # calling again when the run is complete trains nothing and keeps the state
    again, rows = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                             data=ArraySource())
    assert rows == [] and int(again.step) == N
    assert_trees_bitwise(again, straight[1])


class _CrashingSource(ArraySource):
    def __init__(self, crash_at: int):
        super().__init__()
        self.crash_at = crash_at

    def next(self):
        if self.handed == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().next()


def test_resume_after_crash_truncates_ledger(straight, tmp_path):
    run_dir = str(tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop(cfg(N, save_every=2), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                   data=_CrashingSource(crash_at=5), eval_fn=eval_fn)
    assert len(_ledger(run_dir).splitlines()) == 5  # steps 0..4 ran; step 4 is not saved
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ckpt.latest_step() == 4
    ckpt.close()
    data = ArraySource()
    state, _ = train_loop(cfg(N, save_every=2), run_dir=run_dir, state=fresh_state(),
                          step_fn=STEP, data=data, eval_fn=eval_fn)
    _assert_same_run(run_dir, state, data, straight)


class _SigtermSource(ArraySource):
    def next(self):
        if self.handed == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered while step 2 runs
        return super().next()


def test_sigterm_saves_current_step_and_resumes(straight, tmp_path):
    run_dir = str(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)
    state, _ = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                          data=_SigtermSource(), eval_fn=eval_fn)
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored
    assert int(state.step) == 3
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ckpt.all_steps() == [3]
    ckpt.close()
    data = ArraySource()
    state, _ = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP, data=data,
                          eval_fn=eval_fn)
    _assert_same_run(run_dir, state, data, straight)


class _CtrlCSource(ArraySource):
    """Ctrl-C while step 2 runs (``times`` SIGINTs)."""

    def __init__(self, times: int):
        super().__init__()
        self.times = times

    def next(self):
        if self.handed == 2:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        return super().next()


def test_ctrl_c_saves_like_sigterm_and_the_resume_is_announced(straight, tmp_path, capsys):
    run_dir = str(tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    state, _ = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                          data=_CtrlCSource(1), eval_fn=eval_fn)
    assert signal.getsignal(signal.SIGINT) == previous  # handler restored
    assert int(state.step) == 3
    err = capsys.readouterr().err
    assert "SIGINT: saved step 3; stopping (run the same command again to resume)" in err
    data = ArraySource()
    state, _ = train_loop(cfg(N), run_dir=run_dir, state=fresh_state(), step_fn=STEP, data=data,
                          eval_fn=eval_fn)
    assert f"resuming {run_dir} from step 3 of {N}" in capsys.readouterr().err
    _assert_same_run(run_dir, state, data, straight)


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    run_dir = str(tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        train_loop(cfg(N, save_every=2), run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                   data=_CtrlCSource(2), eval_fn=eval_fn)
    assert signal.getsignal(signal.SIGINT) == previous
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ckpt.all_steps() == [2]  # the last periodic save; nothing written for the abort
    ckpt.close()


def test_non_finite_stops_after_max_consecutive_skips(tmp_path):
    run_dir = str(tmp_path)
    data = ArraySource(bad_from=3)  # batches 3, 4, ... have a NaN target
    with pytest.raises(NonFiniteError, match="2 consecutive steps had non-finite gradients"):
        train_loop(cfg(10, save_every=1, max_consecutive_skips=2), run_dir=run_dir,
                   state=fresh_state(), step_fn=STEP, data=data)
    assert data.handed == 5  # stopped at the second consecutive bad step, not later
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=3)
    assert ckpt.latest_step() == 4
    last, meta = ckpt.restore(None, fresh_state())
    good, _ = ckpt.restore(3, fresh_state())
    ckpt.close()
    assert_all_finite(last, "checkpointed state")
    assert int(last.skipped) == 1 and int(last.step) == 4 and meta["data"]["handed"] == 4
    assert_trees_bitwise(last.params, good.params)  # the skipped step changed nothing
    assert_trees_bitwise(last.opt_state, good.opt_state)
    rows = read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["update_skipped"] for r in rows if r["split"] == "train"] == [0.0, 0.5]


def test_resume_after_crash_logs_every_step_once(tmp_path):
    """The crashed invocation logged steps 4 and 5 after its last checkpoint (3): the resumed
    run's metrics.jsonl and TensorBoard view (its writer purges from step 4 on) equal those of
    an uninterrupted run."""
    config = cfg(N, log_every=1, save_every=3)
    ref, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    train_loop(config, run_dir=ref, state=fresh_state(), step_fn=STEP, data=ArraySource(),
               eval_fn=eval_fn)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop(config, run_dir=run_dir, state=fresh_state(), step_fn=STEP,
                   data=_CrashingSource(crash_at=5), eval_fn=eval_fn)
    assert [r["step"] for r in read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r["split"] == "train"] == [1, 2, 3, 4, 5]
    train_loop(config, run_dir=run_dir, state=fresh_state(), step_fn=STEP, data=ArraySource(),
               eval_fn=eval_fn)

    def rows(d):  # the wall-clock time aside
        return [{k: v for k, v in r.items() if k != "time"}
                for r in read_jsonl_metrics(os.path.join(d, "metrics.jsonl"))]

    assert [r["step"] for r in rows(run_dir) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert rows(run_dir) == rows(ref)
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))) == 2
    tb = read_scalars(os.path.join(run_dir, "tensorboard"))
    assert tb == read_scalars(os.path.join(ref, "tensorboard"))
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_non_finite_limit_is_read_at_the_next_log_boundary(tmp_path):
    """No host sync per step: the limit (reached at step 3) is read at the log boundary of
    step 4, and the error names step 3; no checkpoint was written, none is claimed."""
    data = ArraySource(bad_from=1)
    with pytest.raises(NonFiniteError, match=r"^2 consecutive steps had non-finite gradients "
                                             r"\(last at step 3\).*Last good checkpoint: None$"):
        train_loop(cfg(N, log_every=4, eval_every=0, max_consecutive_skips=2),
                   run_dir=str(tmp_path), state=fresh_state(), step_fn=STEP, data=data)
    assert data.handed == 4
    ckpt = Checkpointer(os.path.join(str(tmp_path), "checkpoints"))
    assert ckpt.all_steps() == []
    ckpt.close()
    assert read_jsonl_metrics(os.path.join(str(tmp_path), "metrics.jsonl")) == []


def test_skip_count_is_read_only_at_sync_points(tmp_path, monkeypatch):
    """No host sync per step: the on-device skip watch is read at log rows, evaluations, saves
    and the end only, so its reads do not grow with the number of steps."""
    reads, check = [], loop._SkipWatch.check
    monkeypatch.setattr(loop._SkipWatch, "check",
                        lambda self, last: reads.append(last) or check(self, last))
    for total in (3, 6):
        reads.clear()
        train_loop(cfg(total, log_every=total, eval_every=0), run_dir=str(tmp_path / str(total)),
                   state=fresh_state(), step_fn=STEP, data=ArraySource())
        assert reads == [None, None, None]  # the log row, the end of the run, its save


def test_mlflow_tracker_gets_rows_and_hparams(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "loop")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    logging = LoggingConfig(progress=False, tensorboard=False, mlflow=str(store),
                            run_name="toy")
    hparams = {"learning_rate": 0.05, "loop": {"total_steps": N}}
    for name, data, total in (("ok", ArraySource(), 3), ("nan", ArraySource(bad_from=0), N)):
        with pytest.raises(NonFiniteError) if name == "nan" else contextlib.nullcontext():
            train_loop(cfg(total, max_consecutive_skips=2), run_dir=str(tmp_path / name),
                       state=fresh_state(), step_fn=STEP, data=data, eval_fn=eval_fn,
                       logging=logging, hparams=hparams)
    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("loop").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("toy", "FINISHED"),
                                                                ("toy", "FAILED")]
    assert runs[0].data.params == {"learning_rate": "0.05", "loop.total_steps": str(N)}
    disk = read_jsonl_metrics(os.path.join(str(tmp_path / "ok"), "metrics.jsonl"))
    for split in ("train", "eval"):
        got = client.get_metric_history(runs[0].info.run_id, f"{split}/loss")
        assert [(m.step, m.value) for m in got] == [(r["step"], r["loss"]) for r in disk
                                                    if r["split"] == split]


@pytest.mark.parametrize("bad", [
    dict(total_steps=0), dict(total_steps=3, log_every=0), dict(total_steps=3, eval_every=-1),
    dict(total_steps=3, save_every=-2), dict(total_steps=3, keep_checkpoints=0),
    dict(total_steps=3, max_consecutive_skips=0),
])
def test_loop_config_validation(bad):
    with pytest.raises(ValueError):
        LoopConfig(**bad)


def test_console_sink_prints_every_evaluation(tmp_path, capsys):
    state, rows = train_loop(cfg(3), run_dir=str(tmp_path), state=fresh_state(), step_fn=STEP,
                             data=ArraySource(), eval_fn=eval_fn)
    err = capsys.readouterr().err
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3]
    for r in evals:  # one line per evaluation, with the same (rounded) figure as metrics.jsonl
        assert f"step {r['step']} eval: loss={r['loss']:.4g}" in err
    state, _ = train_loop(cfg(3), run_dir=str(tmp_path / "quiet"), state=fresh_state(),
                          step_fn=STEP, data=ArraySource(), eval_fn=eval_fn,
                          logging=dataclasses.replace(LOG, console=False))
    assert "eval:" not in capsys.readouterr().err
