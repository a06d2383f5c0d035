"""Never lose work: a real SFT process SIGKILLed while Orbax writes a checkpoint (three times),
then stopped by SIGTERM, then restarted to the end, equals an uninterrupted run bit for bit; a
failing asynchronous save raises and deletes nothing older.

A state with a non-finite leaf is never saved: ``tests/train/test_checkpoint.py::
test_non_finite_state_is_refused_and_nothing_written`` holds that promise (not repeated here).

The crash chain runs ``tests/reliability/_sft_child.py`` as a subprocess over one run directory:

1. three times: start it, poll ``checkpoints/`` until a ``<step>.orbax-checkpoint-tmp``
   directory (a save in flight: Orbax writes there, then renames) of a step past the resume
   point appears, SIGKILL it at once, and record what is on disk;
2. start it, wait until it has written a new complete checkpoint, send SIGTERM;
3. start it once more and let it finish.

The reference is the same run, uninterrupted, in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.pipelines import sft
from rlhf_jax.train import (Checkpointer, LoopConfig, OptimizerConfig, create_train_state,
                            make_optimizer, make_train_step, read_jsonl_metrics, train_loop)
from tests.helpers import assert_all_finite
from tests.pipelines.common import assert_states_equal, flat
from tests.reliability.conftest import QUIET, crash_sft_config, ledger
from tests.train.common import ArraySource, assert_trees_bitwise, host, toy_loss, toy_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, SAVE_EVERY, KILLS = 24, 2, 3
TMP = ".orbax-checkpoint-tmp"
TIMEOUT_S = 180.0


def _listing(ckpt_dir: str) -> list[str]:
    try:
        return sorted(os.listdir(ckpt_dir))
    except FileNotFoundError:
        return []


def _complete(names: list[str]) -> list[int]:
    return sorted(int(n) for n in names if n.isdigit())


def _in_flight(names: list[str]) -> list[int]:
    return sorted(int(n[:-len(TMP)]) for n in names if n.endswith(TMP))


class _Child:
    """The SFT process; stdout/stderr go to files (a full pipe would block it)."""

    def __init__(self, spec_path: str, log_dir: str, n: int):
        self.out_path = os.path.join(log_dir, f"child{n}.out")
        self.err_path = os.path.join(log_dir, f"child{n}.err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability._sft_child", spec_path], cwd=REPO,
                stdout=out, stderr=err, env=dict(os.environ, PYTHONPATH=REPO))

    def wait_for(self, condition, what: str):
        """Poll ``condition()`` every 1 ms; return its first truthy value."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < TIMEOUT_S:
            hit = condition()
            if hit:
                return hit
            if self.proc.poll() is not None:
                raise AssertionError(f"child exited ({self.proc.returncode}) before {what}:\n"
                                     f"{self.stderr()[-3000:]}")
            time.sleep(0.001)
        self.proc.kill()
        raise AssertionError(f"timed out waiting for {what}")

    def finish(self) -> int:
        return self.proc.wait(timeout=TIMEOUT_S)

    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err_path) as f:
            return f.read()

    def resumed_from(self) -> int:
        m = re.search(r"^RESUME (-?\d+)$", self.stdout(), re.M)
        assert m, self.stdout()
        return int(m.group(1))


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory):
    """Run the kill chain and the uninterrupted reference; return what was observed."""
    root = str(tmp_path_factory.mktemp("crash"))
    spec = dict(train_data=world.pref["sft"], tokenizer=world.tokenizer,
                output_dir=os.path.join(root, "run"), steps=STEPS, save_every=SAVE_EVERY)
    spec_path = os.path.join(root, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    ckpt_dir = os.path.join(spec["output_dir"], "checkpoints")
    kills, resume, n = [], 0, 0
    for _ in range(KILLS):
        child = _Child(spec_path, root, n)
        n += 1
        threshold = resume + 2 * SAVE_EVERY  # at least one new save completes first

        def saving():
            late = [s for s in _in_flight(_listing(ckpt_dir)) if s >= threshold]
            return late[0] if late else None

        step = child.wait_for(saving, f"a save in flight of a step >= {threshold}")
        child.proc.send_signal(signal.SIGKILL)
        rc = child.finish()
        names = _listing(ckpt_dir)
        ck = Checkpointer(ckpt_dir)
        latest = ck.latest_step()
        ck.close()
        kills.append({"rc": rc, "saving": step, "names": names, "latest": latest,
                      "resumed_from_before": child.resumed_from()})
        resume = latest

    # SIGTERM once the restarted process has written a new complete checkpoint
    term = _Child(spec_path, root, n)
    n += 1
    term.wait_for(lambda: any(s > resume for s in _complete(_listing(ckpt_dir))),
                  "a new complete checkpoint")
    term.proc.send_signal(signal.SIGTERM)
    term_rc = term.finish()
    last = _Child(spec_path, root, n)
    last_rc = last.finish()

    reference = sft.run(crash_sft_config(**(spec | {"output_dir": os.path.join(root, "ref")})))
    return dict(kills=kills, term=term, term_rc=term_rc, last=last, last_rc=last_rc,
                run_dir=spec["output_dir"], ckpt_dir=ckpt_dir, reference=reference)


def test_sigkill_during_save_resumes_from_last_complete_step(chain):
    kills = chain["kills"]
    assert len(kills) == KILLS
    for i, k in enumerate(kills):
        assert k["rc"] == -signal.SIGKILL, k
        complete = _complete(k["names"])
        # the step being written when the process died was never committed ...
        assert k["saving"] not in complete, k
        # ... and the latest step Orbax reports is the newest *complete* directory
        assert k["latest"] == complete[-1], k
        assert k["latest"] < k["saving"] and k["latest"] % SAVE_EVERY == 0, k
        # the next process resumed from exactly that step
        nxt = chain["term"] if i == KILLS - 1 else None
        resumed = nxt.resumed_from() if nxt else kills[i + 1]["resumed_from_before"]
        assert resumed == k["latest"], (i, k, resumed)
    # every kill landed after the previous resume: the run made progress in between
    assert [k["latest"] for k in kills] == sorted({k["latest"] for k in kills}), kills
    # at least one kill caught Orbax with its temporary directory still on disk
    survived_in_flight = sum(1 for k in kills if _in_flight(k["names"]))
    assert survived_in_flight >= 1, kills


def test_sigterm_saves_current_step_and_exits_cleanly(chain):
    term, last = chain["term"], chain["last"]
    assert chain["term_rc"] == 0, term.stderr()[-3000:]
    m = re.search(r"SIGTERM: saved step (\d+); stopping", term.stderr())
    assert m, term.stderr()[-3000:]
    saved = int(m.group(1))
    assert term.resumed_from() < saved < STEPS
    # the stage exported the state it stopped at, and says it is not complete
    assert f"DONE {saved} complete=False" in term.stdout()
    assert last.resumed_from() == saved  # the restart continues from exactly that step
    assert chain["last_rc"] == 0 and f"DONE {STEPS} complete=True" in last.stdout(), \
        last.stderr()[-3000:]


def test_interrupted_run_equals_uninterrupted_bitwise(chain):
    ref = chain["reference"]
    # the batch ledger: every step once, in the same order (nothing repeated or skipped)
    got, want = ledger(chain["run_dir"]), ledger(ref["run_dir"])
    assert len(want) == STEPS and [ln.split("\t")[0] for ln in got] == [str(i) for i in
                                                                        range(STEPS)]
    assert got == want
    # exported weights, bit for bit
    _, params = load_hf_checkpoint(os.path.join(chain["run_dir"], "model"), heads=("lm",))
    _, ref_params = load_hf_checkpoint(ref["model_dir"], heads=("lm",))
    a, b = flat(params), flat(ref_params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the whole final TrainState (optimizer moments, step, key) from the last checkpoint
    ck = Checkpointer(chain["ckpt_dir"])
    assert ck.latest_step() == STEPS
    state, meta = ck.restore(None, ref["state"])
    ck.close()
    assert_states_equal(state, ref["state"])
    assert meta["step"] == STEPS
    # metrics.jsonl: one train row per step (rows of killed steps were dropped on restart)
    rows = [r for r in read_jsonl_metrics(os.path.join(chain["run_dir"], "metrics.jsonl"))
            if r["split"] == "train"]
    ref_rows = [r for r in read_jsonl_metrics(os.path.join(ref["run_dir"], "metrics.jsonl"))
                if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


# --- a failing asynchronous save -------------------------------------------------------------

class _DiskFull:
    """An Orbax commit future whose write fails (as a full or vanished disk would)."""

    def result(self, timeout=None):
        raise OSError("simulated: No space left on device")


def _fail_state_saves(monkeypatch, *, from_call: int) -> list[int]:
    """Make the ``from_call``-th and later writes of the ``state`` item fail in the background
    thread (Orbax's async commit), the earlier ones succeed."""
    calls = []
    original = ocp.StandardCheckpointHandler.async_save

    async def async_save(self, directory, *args, **kwargs):
        calls.append(1)
        if len(calls) >= from_call:
            return [_DiskFull()]
        return await original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
    return calls


def _toy_state(opt, seed=0):
    return create_train_state(toy_params(seed), opt, seed=seed)


def test_failing_async_save_raises_and_deletes_nothing_older(tmp_path, monkeypatch):
    opt = optax.adamw(1e-3)
    ck = Checkpointer(str(tmp_path), max_to_keep=2)
    states = {s: host(_toy_state(opt, seed=s)) for s in (1, 2, 3)}
    for s in (1, 2):
        ck.save(s, _toy_state(opt, seed=s), {"step": s}, force=True)
    ck.wait()
    _fail_state_saves(monkeypatch, from_call=1)
    ck.save(3, _toy_state(opt, seed=3), {"step": 3}, force=True)  # the write fails later
    with pytest.raises(OSError, match="No space left on device"):
        ck.wait()
    ck.close()
    monkeypatch.undo()
    # step 3 never became a checkpoint; steps 1 and 2 (max_to_keep=2) are still there, intact
    names = sorted(os.listdir(tmp_path))
    assert "3" not in names and {"1", "2"} <= set(names), names
    fresh = Checkpointer(str(tmp_path), max_to_keep=2)
    assert fresh.all_steps() == [1, 2] and fresh.latest_step() == 2
    for s in (1, 2):
        restored, meta = fresh.restore(s, _toy_state(opt))
        assert meta == {"step": s}
        assert_trees_bitwise(restored, states[s])
    fresh.close()


def test_failing_async_save_stops_train_loop_and_keeps_last_good(tmp_path, monkeypatch):
    opt = make_optimizer(OptimizerConfig(learning_rate=5e-2, schedule="constant"), 6)
    step = make_train_step(toy_loss, opt)
    cfg = LoopConfig(total_steps=6, log_every=1, save_every=2, keep_checkpoints=1)
    good_dir = str(tmp_path / "good")
    good, _ = train_loop(dataclasses.replace(cfg, total_steps=2), run_dir=good_dir,
                         state=_toy_state(opt), step_fn=step, data=ArraySource(),
                         logging=QUIET)
    good = host(good)
    run_dir = str(tmp_path / "failing")
    _fail_state_saves(monkeypatch, from_call=2)  # the save of step 2 works, step 4's fails
    with pytest.raises(OSError, match="No space left on device"):
        train_loop(cfg, run_dir=run_dir, state=_toy_state(opt), step_fn=step,
                   data=ArraySource(), logging=QUIET)
    monkeypatch.undo()
    # keep_checkpoints=1 would have replaced step 2 by step 4; as 4 failed, 2 stays
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=1)
    assert ck.all_steps() == [2]
    restored, meta = ck.restore(None, _toy_state(opt))
    ck.close()
    assert meta["step"] == 2
    assert_all_finite(restored, "restored state")
    assert_trees_bitwise(restored, good)

