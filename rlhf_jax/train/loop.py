"""The training loop: the only place that does I/O, logging, evaluation and checkpointing.

One iteration: take the next batch from a resumable iterator, run the jitted step, append the
batch's hash to the ledger, and every so often log, evaluate and save. Everything a resumed run
needs is in the checkpoint: the ``TrainState`` (params, optimizer and algorithm state, step, base
RNG key) and, as JSON metadata, the data iterator's position. Restarting with the same
``run_dir`` continues from the latest complete checkpoint and reproduces the uninterrupted run.

SIGTERM (a scheduler's pre-emption notice) saves the current step, waits for the write and stops
cleanly; too many consecutive non-finite gradients stop the run with a message saying so.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np

from rlhf_jax.parallel import is_main_process
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.sinks import JsonlSink, TensorBoardSink


class BatchSource(Protocol):
    def next(self) -> Any: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and save."""

    total_steps: int
    """Training steps (batches) in the whole run."""
    log_every: int = 10
    """Write averaged training metrics every this many steps."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end, if an eval function is given)."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept on disk."""
    max_consecutive_skips: int = 10
    """Stop after this many consecutive steps whose gradient was non-finite."""
    progress: bool = True
    """Show a progress bar (stderr)."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    console: bool = True
    """Print every evaluation's metrics to stderr (training metrics are on the progress bar)."""
    eval_at_start: bool = True
    """Evaluate the initial state too (step 0, fresh runs only): the baseline of every curve."""

    def __post_init__(self):
        if self.total_steps < 1 or self.log_every < 1:
            raise ValueError("total_steps and log_every must be >= 1")
        if min(self.eval_every, self.save_every) < 0 or self.keep_checkpoints < 1:
            raise ValueError("eval_every/save_every must be >= 0 and keep_checkpoints >= 1")
        if self.max_consecutive_skips < 1:
            raise ValueError("max_consecutive_skips must be >= 1")


class NonFiniteError(RuntimeError):
    """Raised when gradients stay non-finite for too many consecutive steps."""


def _batch_hash(batch) -> str:
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(batch):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.integer):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class _Ledger:
    """``ledger.tsv``: one ``step<TAB>batch hash`` line per step; truncated on resume.

    Line-buffered, so a process killed at any moment (SIGKILL, OOM) has every line of the
    steps it ran on disk; the truncation writes a new file and renames it over the old one.
    """

    def __init__(self, path: str, resume_step: int):
        lines = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = [ln for ln in f if ln.strip() and int(ln.split("\t")[0]) < resume_step]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8", buffering=1)

    def add(self, step: int, digest: str) -> None:
        self._f.write(f"{step}\t{digest}\n")

    def close(self) -> None:
        self._f.close()


def _truncate_metrics(path: str, resume_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not os.path.exists(path):
        return
    import json

    with open(path, encoding="utf-8") as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _mean_rows(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    host = jax.device_get(rows)
    return {k: float(np.mean([r[k] for r in host])) for k in host[0]}


def _progress(cfg: LoopConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.total_steps, initial=start, desc="train", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.1)


def train_loop(
    cfg: LoopConfig,
    *,
    run_dir: str,
    state,
    step_fn: Callable,
    data: BatchSource,
    eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
    tokens_in: Callable[[Any], int] | None = None,
    postfix: tuple[str, ...] = ("loss",),
) -> tuple[Any, list[dict]]:
    """Train ``state`` with ``step_fn`` on ``data`` until ``cfg.total_steps``; resumable.

    Returns the final state and the logged rows (train and eval) of this invocation.
    """
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
    restored = ckpt.restore(None, state)
    if restored is not None:
        state, meta = restored
        data.restore(meta["data"])
    start = int(state.step)
    main = is_main_process()  # the other processes of a multi-host run compute, never write
    ledger = _Ledger(os.path.join(run_dir, "ledger.tsv"), start) if main else None
    if main:
        _truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), start)
    jsonl = JsonlSink(os.path.join(run_dir, "metrics.jsonl")) if main else None
    tb = (TensorBoardSink(os.path.join(run_dir, "tensorboard"))
          if cfg.tensorboard and main else None)
    stop = {"sigterm": False}
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if _main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    bar = _progress(cfg, start) if main else None
    history, pending, tokens, t0 = [], [], 0, time.perf_counter()

    def log(step: int, row: dict, split: str) -> None:
        history.append({"step": step, "split": split} | row)
        if jsonl is not None:
            jsonl.write(step, {"split": split} | row)
        if tb is not None:
            tb.write(step, {f"{split}/{k}": v for k, v in row.items()})
        if main and cfg.console and split == "eval":  # the console sink: train figures on the bar
            _console(bar, f"step {step} eval: " + ", ".join(
                f"{k}={float(v):.4g}" for k, v in sorted(row.items())))

    def save(step: int) -> None:
        ckpt.save(step, state, {"data": data.state(), "step": step}, force=True)

    try:
        if eval_fn is not None and cfg.eval_at_start and start == 0:
            log(0, dict(eval_fn(state)), "eval")
        for step in range(start, cfg.total_steps):
            batch = data.next()
            if ledger is not None:
                ledger.add(step, _batch_hash(batch))
            tokens += tokens_in(batch) if tokens_in else 0
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            if int(state.skipped) >= cfg.max_consecutive_skips:
                raise NonFiniteError(
                    f"{int(state.skipped)} consecutive steps had non-finite gradients (last at "
                    f"step {step + 1}); params were left unchanged. Lower the learning rate or "
                    f"check the data. Last good checkpoint: {ckpt.latest_step()}")
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.total_steps:
                row = _mean_rows(pending)
                elapsed = time.perf_counter() - t0
                if tokens_in:
                    row["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                log(done, row, "train")
                pending, tokens, t0 = [], 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in postfix + ("tokens_per_s",)
                                     if k in row}, refresh=False)
            if eval_fn is not None and ((cfg.eval_every and done % cfg.eval_every == 0)
                                        or done == cfg.total_steps):
                log(done, dict(eval_fn(state)), "eval")
            if bar is not None:
                bar.update(1)
            stopping = _any_process(stop["sigterm"])
            if (cfg.save_every and done % cfg.save_every == 0) or stopping:
                save(done)
            if stopping:
                if main:
                    print(f"SIGTERM: saved step {done}; stopping", file=sys.stderr)
                break
        else:
            if ckpt.latest_step() != cfg.total_steps:
                save(cfg.total_steps)
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        for closer in (ledger, jsonl, tb):
            if closer is not None:
                closer.close()
        ckpt.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return state, history


def _any_process(flag: bool) -> bool:
    """``flag`` or'ed over the processes of a multi-host run (a pre-emption notice reaches
    them at different steps; all must save and stop at the same one). Free with one process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _console(bar, line: str) -> None:
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
