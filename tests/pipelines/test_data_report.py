"""Truncation is never silent: rows cut or skipped for length are counted at load, written to
``result.json`` (``data``: per file) and said again when the run finishes."""

from __future__ import annotations

import json
import os

from rlhf_jax.pipelines import (DataConfig, LoggingConfig, LoopConfig, ModelSpec,
                                OptimizerConfig, sft)


def test_truncated_rows_are_counted_reported_and_said_at_the_end(chat_world, tmp_path, capsys):
    path = chat_world["text"]
    cfg = sft.SFTConfig(
        data=DataConfig(train=path, max_length=8, batch_size=4, on_overflow="truncate"),
        model=ModelSpec(path=chat_world["ckpt"]), output_dir=str(tmp_path / "run"),
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
        loop=LoopConfig(total_steps=1, save_every=1),
        logging=LoggingConfig(progress=False, console=False, tensorboard=False), mesh=None)
    result = sft.run(cfg)
    rows = sum(1 for _ in open(path))
    want = {"rows": rows, "invalid": 0, "too_long": 0, "truncated": rows}
    assert result["data"] == {path: want}
    on_disk = json.load(open(os.path.join(result["run_dir"], "result.json")))
    assert on_disk["data"] == {path: want}
    err = capsys.readouterr().err
    line = f"{path}: skipped 0 invalid and 0 over-long rows, truncated {rows}, of {rows}"
    assert err.count(line) == 2  # at load, and again at the end
    assert "finished on data that lost or cut rows" in err
