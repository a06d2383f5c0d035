"""Checkpoint storage failures (issue 15, item 5): an unwritable ``checkpoints/`` fails at once in
one line, before anything is compiled; a damaged latest step falls back to the newest readable one
and says so (the run then equals an uninterrupted one bitwise); ``loop.resume_from=STEP|PATH``
chooses where to resume.

Each test trains the tiny regression model of ``tests/train/common.py`` with ``train_loop``:
4 steps saved every 2 (steps 2 and 4), then damages files and resumes to step 6.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
import time

import optax
import pytest

from rlhf_jax.pipelines import sft
from rlhf_jax.train import (CheckpointError, Checkpointer, LoopConfig, OptimizerConfig,
                            create_train_state, make_optimizer, make_train_step, train_loop)
from tests.reliability.conftest import QUIET, crash_sft_config
from tests.train.common import ArraySource, assert_trees_bitwise, host, toy_loss, toy_params

OPT = make_optimizer(OptimizerConfig(learning_rate=5e-2, schedule="constant"), 6)
STEP = make_train_step(toy_loss, OPT)
LOOP = LoopConfig(total_steps=6, log_every=1, save_every=2, keep_checkpoints=5,
                  eval_at_start=False)


def _train(run_dir, *, steps=6, **loop):
    cfg = dataclasses.replace(LOOP, total_steps=steps, **loop)
    state = create_train_state(toy_params(), OPT, seed=0)
    state, _ = train_loop(cfg, run_dir=str(run_dir), state=state, step_fn=STEP,
                          data=ArraySource(), logging=QUIET)
    return host(state)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("whole"))


def _chunks(run_dir, step) -> list[str]:
    """The array-data files of ``step`` (TensorStore's OCDBT chunks; which of them hold which
    array depends on the write's timing, so the tests damage them all)."""
    return glob.glob(os.path.join(run_dir, "checkpoints", str(step), "state", "**", "d", "*"),
                     recursive=True)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _overwrite_middle(path):
    """Change bytes inside the chunk without changing its size: TensorStore reads this back as
    different numbers without an error; only the saved fingerprints catch it."""
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(16)
    with open(path, "wb") as f:
        f.write(bytes(data))


# ----------------------------------------------------------------------- unwritable storage
def test_unwritable_checkpoints_fail_at_once_in_one_line(tmp_path):
    blocked = tmp_path / "run" / "checkpoints"
    blocked.parent.mkdir()
    blocked.write_text("a file where the folder should be")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        Checkpointer(str(blocked))
    assert time.perf_counter() - t0 < 5  # Orbax's retries took 300 s
    assert str(blocked) in str(e.value) and "\n" not in str(e.value)


def test_permission_denied_fails_before_the_pipeline_compiles(world, tmp_path, monkeypatch):
    # As root the tests cannot lose write permission; the probe's EACCES is simulated.
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "sft"
    cfg = crash_sft_config(train_data=world.pref["sft"], tokenizer=world.tokenizer,
                           output_dir=str(out), steps=2, save_every=1)
    with pytest.raises(CheckpointError, match="Permission denied .*make it writable"):
        sft.run(cfg)
    assert not (out / "config.json").exists()  # nothing written, nothing compiled


# ----------------------------------------------------------------------- damaged latest step
@pytest.mark.parametrize("damage", [_truncate, _overwrite_middle])
def test_damaged_latest_step_falls_back_and_resumes_exactly(tmp_path, capsys, uninterrupted,
                                                            damage):
    _train(tmp_path, steps=4)  # steps 2 and 4
    for path in _chunks(tmp_path, 4):
        damage(path)
    final = _train(tmp_path)
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "damaged" in err and "falling back to step 2" in err
    assert f"resuming {tmp_path} from step 2 of 6" in err
    assert len(glob.glob(str(tmp_path / "checkpoints.damaged" / "4-*"))) == 1  # kept aside
    assert_trees_bitwise(final, uninterrupted)


def test_every_step_damaged_is_one_clear_error(tmp_path):
    _train(tmp_path, steps=4)
    for step in (2, 4):
        for path in _chunks(tmp_path, step):
            _truncate(path)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .*step 4: .*step 2: "
                                              r".*resume_from=PATH"):
        _train(tmp_path)


def test_a_named_damaged_step_never_falls_back(tmp_path):
    _train(tmp_path, steps=4)
    for path in _chunks(tmp_path, 4):
        _truncate(path)
    with pytest.raises(CheckpointError, match="step 4 .* is damaged"):
        _train(tmp_path, resume_from="4")


# ----------------------------------------------------------------------- resume_from
def test_resume_from_step_sets_newer_steps_aside(tmp_path, capsys, uninterrupted):
    _train(tmp_path)  # steps 2, 4, 6
    final = _train(tmp_path, resume_from="2")
    err = capsys.readouterr().err
    assert "the newer steps [4, 6] moved to" in err and "from step 2 of 6" in err
    assert len(os.listdir(tmp_path / "checkpoints.superseded")) == 2
    assert_trees_bitwise(final, uninterrupted)
    with pytest.raises(CheckpointError, match=r"resume_from=3: .* holds steps \[2, 4, 6\]"):
        _train(tmp_path, resume_from="3")


def test_resume_from_path_starts_from_another_runs_step(tmp_path, capsys, uninterrupted):
    _train(tmp_path / "a", steps=4)
    final = _train(tmp_path / "b", resume_from=str(tmp_path / "a" / "checkpoints" / "2"))
    assert "from step 2 of 6 (the checkpoint in" in capsys.readouterr().err
    assert_trees_bitwise(final, uninterrupted)
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["2", "4"]  # source untouched
    # run again: this run's own checkpoints win, and the log says the option was not used
    _train(tmp_path / "b", resume_from=str(tmp_path / "a"))
    assert "not used" in capsys.readouterr().err


def test_resume_from_nonsense_is_refused_at_config_time():
    with pytest.raises(ValueError, match="resume_from='nope' is neither a step number nor"):
        LoopConfig(total_steps=2, resume_from="nope")


def test_restore_rejects_a_changed_structure_without_falling_back(tmp_path):
    _train(tmp_path, steps=4)
    other = create_train_state({"w": toy_params()["w"]}, optax.sgd(0.1), seed=0)
    ck = Checkpointer(str(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="does not match the expected state"):
        ck.restore(None, other)
    ck.close()
    assert not (tmp_path / "checkpoints.damaged").exists()
