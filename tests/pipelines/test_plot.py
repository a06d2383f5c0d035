"""``rlhf-jax plot RUN_DIR ...`` (``pipelines.plot.main``): redraws each run's plots, prints the
paths; a directory without ``metrics.jsonl`` is an error (exit 2) that names it."""

from __future__ import annotations

import os

from rlhf_jax.pipelines import plot
from tests.train.test_plots import EVAL, TRAIN, assert_png, write_metrics


def test_plot_main_redraws_and_prints_paths(tmp_path, capsys):
    a = write_metrics(tmp_path / "a", TRAIN + EVAL)
    b = write_metrics(tmp_path / "b", TRAIN)
    assert plot.main([a, b]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [os.path.join(a, "plots", "train.png"), os.path.join(a, "plots", "eval.png"),
                       os.path.join(b, "plots", "train.png")]
    for p in printed:
        assert_png(p)


def test_plot_main_without_metrics_is_an_error_naming_the_directory(tmp_path, capsys):
    good = write_metrics(tmp_path / "good", TRAIN)
    bad = tmp_path / "not_a_run"
    bad.mkdir()
    assert plot.main([good, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not_a_run" in err and "metrics.jsonl" in err
    assert not os.path.exists(os.path.join(good, "plots"))  # checked before drawing anything


def test_plot_main_with_an_empty_metrics_file(tmp_path, capsys):
    empty = write_metrics(tmp_path / "empty", [])
    assert plot.main([empty]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no metric to plot" in out.err
