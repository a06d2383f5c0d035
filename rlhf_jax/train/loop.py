"""The training loop: the only place that does I/O, logging, evaluation and checkpointing.

One iteration: take the next batch from a resumable iterator, run the jitted step, append the
batch's hash to the ledger, and every so often log, evaluate and save. Everything a resumed run
needs is in the checkpoint: the ``TrainState`` (params, optimizer and algorithm state, step, base
RNG key) and, as JSON metadata, the data iterator's position. Restarting with the same
``run_dir`` continues from the latest complete checkpoint and reproduces the uninterrupted run.

The host never waits for the device between steps: the count of consecutive non-finite steps
(``state.skipped``) is watched on device and read only where the loop syncs anyway (a log row,
an evaluation, a save, the end), so a run that hits ``max_consecutive_skips`` stops there with
``NonFiniteError`` naming the step where the limit was reached, and saves nothing after it.
SIGTERM (a scheduler's pre-emption notice) and a first Ctrl-C (SIGINT) save the current step,
wait for the write and stop cleanly (the stage's result then says ``complete: false``); a second
Ctrl-C aborts at once. A resume is said on stderr. Where metrics go (progress bar, console,
TensorBoard, trackers) is ``LoggingConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.fileio import atomic_write
from rlhf_jax.parallel import is_main_process
from rlhf_jax.train.checkpoint import CheckpointError, Checkpointer
from rlhf_jax.train.sinks import JsonlSink, LoggingConfig, open_trackers


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
    eval_at_start: bool = True
    """Evaluate the initial state too (step 0, fresh runs only): the baseline of every curve."""
    resume_from: str | None = None
    """``STEP``: resume from that saved step (newer ones move to ``checkpoints.superseded/``);
    ``PATH``: start from another run's checkpoint (a run dir, its ``checkpoints/`` or one step
    in it) while this run has none of its own; None: the newest readable step."""

    def __post_init__(self):
        if self.total_steps < 1 or self.log_every < 1:
            raise ValueError("total_steps and log_every must be >= 1")
        if min(self.eval_every, self.save_every) < 0 or self.keep_checkpoints < 1:
            raise ValueError("eval_every/save_every must be >= 0 and keep_checkpoints >= 1")
        if self.max_consecutive_skips < 1:
            raise ValueError("max_consecutive_skips must be >= 1")
        r = self.resume_from
        if r is not None and not r.isdigit() and not os.path.isdir(r):
            raise ValueError(f"loop.resume_from={r!r} is neither a step number nor a directory "
                             f"(give STEP, a run directory, its checkpoints/ or a step in it)")


class NonFiniteError(RuntimeError):
    """Raised when gradients stay non-finite for too many consecutive steps."""


def _batch_hash(batch) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(batch):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.integer):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class _Ledger:
    """``ledger.tsv``: one ``step<TAB>batch hash`` line per step; truncated on resume.

    Line-buffered, so a process killed at any moment (SIGKILL, OOM) has every line of the
    steps it ran on disk; the truncation is an atomic rewrite (``fileio.atomic_write``).
    """

    def __init__(self, path: str, resume_step: int):
        lines = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = [ln for ln in f if ln.strip() and int(ln.split("\t")[0]) < resume_step]
        atomic_write(path, "".join(lines))
        self._f = open(path, "a", encoding="utf-8", buffering=1)

    def add(self, step: int, digest: str) -> None:
        self._f.write(f"{step}\t{digest}\n")

    def close(self) -> None:
        self._f.close()


def _truncate_metrics(path: str, resume_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= resume_step]
    atomic_write(path, "".join(keep))


@functools.partial(jax.jit, static_argnums=3)
def _first_at_limit(first, skipped, step, limit: int):
    """``step`` if this is the first step whose consecutive-skip count reached ``limit``."""
    return jnp.where((first == 0) & (skipped >= limit), step, first).astype(jnp.int32)


class _SkipWatch:
    """The first step at which ``state.skipped`` reached the limit, kept on device: one async
    dispatch per step, read (one scalar, a host sync) only by ``check``."""

    def __init__(self, limit: int):
        self.limit = limit
        self._first = np.zeros((), np.int32)  # numpy: valid under any mesh, multi-host too

    def note(self, state) -> None:
        self._first = _first_at_limit(self._first, state.skipped, state.step, self.limit)

    def check(self, last_good: int | None) -> None:
        first = int(jax.device_get(self._first))
        if first:
            raise NonFiniteError(
                f"{self.limit} consecutive steps had non-finite gradients (last at step "
                f"{first}); params were left unchanged. Lower the learning rate or check the "
                f"data. Last good checkpoint: {last_good}")


def _mean_rows(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    host = jax.device_get(rows)
    return {k: float(np.mean([r[k] for r in host])) for k in host[0]}


class _Run:
    """One call of ``train_loop``: what it holds open (checkpointer, ledger, sinks, progress
    bar, SIGTERM handler) and its periodic actions (log, evaluate, save, the stop checks)."""

    def __init__(self, cfg: LoopConfig, logging: LoggingConfig, run_dir: str, data: BatchSource,
                 tokens_in: Callable[[Any], int] | None, postfix: tuple[str, ...]):
        os.makedirs(run_dir, exist_ok=True)
        self.cfg, self.logging, self.run_dir, self.data = cfg, logging, run_dir, data
        self.tokens_in, self.postfix = tokens_in, postfix
        self.ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"),
                                 max_to_keep=cfg.keep_checkpoints)
        self.main = is_main_process()  # the other processes of a multi-host run never write
        self.skips = _SkipWatch(cfg.max_consecutive_skips)
        self.history: list[dict] = []
        self.pending, self.tokens, self.t0 = [], 0, time.perf_counter()
        self.ledger = self.jsonl = self.bar = None
        self.position: dict | None = None  # with lookahead: the data position a save records
        self._previous: dict = {}
        self.trackers: list = []
        self.stop_signal: str | None = None

    def open(self, state, hparams: Mapping[str, Any] | None):
        """Restore the latest checkpoint (if any) into ``state`` and ``data``, truncate what
        was logged after it, open the sinks, catch SIGTERM and SIGINT; returns the state to
        train. A resume is said on stderr (``resuming RUN_DIR from step N of M``)."""
        restored, source = self._restore(state)
        if restored is not None:
            state, meta = restored
            self.data.restore(meta["data"])
        self.start = int(jax.device_get(state.step))
        if restored is not None:
            self.say(f"resuming {self.run_dir} from step {self.start} of {self.cfg.total_steps}"
                     + (f" (the checkpoint in {source})" if source else ""))
        if self.main:
            join = functools.partial(os.path.join, self.run_dir)
            self.trackers = open_trackers(self.logging, self.run_dir, hparams=hparams,
                                          start=self.start)
            self.ledger = _Ledger(join("ledger.tsv"), self.start)
            _truncate_metrics(join("metrics.jsonl"), self.start)
            self.jsonl = JsonlSink(join("metrics.jsonl"))
            self.bar = _progress(self.logging, self.cfg, self.start)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        return state

    def say(self, line: str) -> None:
        """One line on stderr, from process 0."""
        if self.main:
            print(line, file=sys.stderr)

    def _restore(self, state):
        """``((state, meta) or None, source)`` per ``LoopConfig.resume_from``; ``source`` names
        another run's checkpoint when one was used."""
        frm, ckpt = self.cfg.resume_from, self.ckpt
        if frm is not None and frm.isdigit():
            step = int(frm)
            if step not in ckpt.all_steps():
                raise CheckpointError(f"loop.resume_from={step}: {ckpt.directory} holds steps "
                                      f"{sorted(ckpt.all_steps())}")
            restored = ckpt.restore(step, state)
            moved = ckpt.set_aside_after(step)
            if moved:
                self.say(f"loop.resume_from={step}: the newer steps {moved} moved to "
                         f"{ckpt.directory}.superseded/")
            return restored, None
        if frm is None or ckpt.all_steps():
            if frm is not None:
                self.say(f"loop.resume_from={frm} not used: {self.run_dir} has checkpoints of "
                         f"its own (latest step {ckpt.latest_step()})")
            return ckpt.restore(None, state, say=self.say), None
        directory, step = _checkpoint_location(frm)
        source = Checkpointer(directory, read_only=True)
        try:
            restored = source.restore(step, state, say=self.say)
        finally:
            source.close()
        if restored is None:
            raise CheckpointError(f"loop.resume_from={frm}: no checkpoint in {directory}")
        return restored, os.path.join(directory, str(int(restored[0].step)))

    def _on_signal(self, signum, _frame) -> None:
        """SIGTERM or a first Ctrl-C: save the current step and stop after it; a second Ctrl-C
        aborts at once (the last saved checkpoint stays the resume point)."""
        if signum == signal.SIGINT and self.stop_signal is not None:
            raise KeyboardInterrupt("second Ctrl-C: stopped without saving this step")
        self.stop_signal = signal.Signals(signum).name
        self.say(f"{self.stop_signal}: saving at the end of this step, then stopping "
                 f"(Ctrl-C again to abort at once)")

    def log(self, step: int, row: dict, split: str) -> None:
        self.history.append({"step": step, "split": split} | row)
        if self.jsonl is not None:
            self.jsonl.write(step, {"split": split} | row)
        tagged = {f"{split}/{k}": v for k, v in row.items()}
        for sink in self.trackers:
            sink.write(step, tagged)
        if self.main and self.logging.console and split == "eval":  # train rows: on the bar
            _console(self.bar, f"step {step} eval: " + ", ".join(
                f"{k}={float(v):.4g}" for k, v in sorted(row.items())))

    def log_train(self, step: int) -> None:
        row = _mean_rows(self.pending)
        if self.tokens_in:
            row["tokens_per_s"] = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.log(step, row, "train")
        self.pending, self.tokens, self.t0 = [], 0, time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in self.postfix + ("tokens_per_s",)
                                  if k in row}, refresh=False)

    def save(self, state, step: int) -> None:
        self.skips.check(self.ckpt.latest_step())  # never save past the skip limit
        data = self.data.state() if self.position is None else self.position
        self.ckpt.save(step, state, {"data": data, "step": step}, force=True)

    def after_step(self, state, done: int, eval_fn) -> bool:
        """The periodic actions after step ``done``; False when SIGTERM / SIGINT stops the run."""
        cfg, last = self.cfg, done == self.cfg.total_steps
        log_now = done % cfg.log_every == 0 or last
        eval_now = eval_fn is not None and (last or bool(cfg.eval_every)
                                            and done % cfg.eval_every == 0)
        if log_now or eval_now:  # the host syncs here anyway: read the skip watch first
            self.skips.check(self.ckpt.latest_step())
        if log_now:
            self.log_train(done)
        if eval_now:
            self.log(done, dict(eval_fn(state)), "eval")
        if self.bar is not None:
            self.bar.update(1)
        stopping = _any_process(self.stop_signal is not None)
        if (cfg.save_every and done % cfg.save_every == 0) or stopping:
            self.save(state, done)
        if stopping:
            self.say(f"{self.stop_signal or 'SIGTERM'}: saved step {done}; stopping (run the "
                     f"same command again to resume)")
        return not stopping

    def close(self, ok: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        for closer in (self.ledger, self.jsonl):
            if closer is not None:
                closer.close()
        for sink in self.trackers:
            sink.close(ok=ok)
        self.ckpt.close()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


_LOGGING = LoggingConfig()  # the default: progress bar, console, TensorBoard


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
    logging: LoggingConfig = _LOGGING,
    hparams: dict | None = None,
    lookahead: bool = False,
) -> tuple[Any, list[dict]]:
    """Train ``state`` with ``step_fn`` on ``data`` until ``cfg.total_steps``; resumable.

    ``lookahead``: call ``step_fn(state, batch, next_batch)`` with the batch of the following
    step too (the one-step-off engine starts that batch's rollout early); the ledger still
    records ``batch`` at its step and a checkpoint the data position just after ``batch``, so a
    resumed run takes ``next_batch`` again as its first batch (the last step, too, starts the
    rollout of the batch after it: the final checkpoint holds it, so an extended run resumes
    exactly; one rollout per run that is trained on only if the run is extended).

    ``logging`` picks the sinks besides ``metrics.jsonl``; ``hparams`` (the run's config as
    JSON-able data) goes to the experiment trackers it enables. Returns the final state and
    the logged rows (train and eval) of this invocation.
    """
    run = _Run(cfg, logging, run_dir, data, tokens_in, tuple(postfix))
    ok = False
    try:
        state = run.open(state, hparams)
        if eval_fn is not None and cfg.eval_at_start and run.start == 0:
            run.log(0, dict(eval_fn(state)), "eval")
        upcoming = None
        for step in range(run.start, cfg.total_steps):
            batch = data.next() if upcoming is None else upcoming
            if lookahead:
                run.position, upcoming = data.state(), data.next()
            if run.ledger is not None:
                run.ledger.add(step, _batch_hash(batch))
            run.tokens += tokens_in(batch) if tokens_in else 0
            state, metrics = (step_fn(state, batch, upcoming) if lookahead
                              else step_fn(state, batch))
            run.pending.append(metrics)
            run.skips.note(state)  # async: no host sync per step
            if not run.after_step(state, step + 1, eval_fn):
                break
        else:
            run.skips.check(run.ckpt.latest_step())
            if run.ckpt.latest_step() != cfg.total_steps:
                run.save(state, cfg.total_steps)
        run.ckpt.wait()
        ok = True
    finally:
        run.close(ok)
    return state, run.history


def _checkpoint_location(path: str) -> tuple[str, int | None]:
    """``(checkpoints directory, step or None for its newest)`` for a run directory, its
    ``checkpoints/`` folder or one step folder in it."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if name.isdigit():
        return os.path.dirname(path), int(name)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    return path, None


def _progress(logging: LoggingConfig, cfg: LoopConfig, start: int):
    if not logging.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.total_steps, initial=start, desc="train", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.1)


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
