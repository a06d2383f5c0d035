"""PNG plots of logged metrics (matplotlib, drawn on ``Figure`` objects without ``pyplot``).

``plot_run`` draws a run directory's own record: ``metrics.jsonl`` becomes ``plots/train.png``
and ``plots/eval.png``, one panel per metric of ``PLOT_GROUPS`` the run logged. Every pipeline
calls it when it finishes (``pipelines.run_dir.finish_run``) and ``rlhf-jax plot RUN_DIR``
redraws it. ``plot_curves`` draws chosen metrics against the step from ``metrics.jsonl`` rows;
``plot_xy`` draws one metric against another (gold reward against KL, say) for one or several
runs; the experiments use those two.

Design choices: figures are ``matplotlib.figure.Figure`` objects, never ``pyplot``, so plotting
inside a pipeline neither switches the caller's backend (a notebook's, say) nor keeps figures
alive in pyplot's global registry. Each PNG is written atomically (``fileio.atomic_path``): a
reader never sees half a file and an old plot stays until its replacement is complete. In a
multi-process run only process 0 draws (the others write nothing).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from rlhf_jax.fileio import atomic_path, check_inside
from rlhf_jax.parallel import is_main_process
from rlhf_jax.train.sinks import read_jsonl_metrics

PLOT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "policy_loss", "value_loss")),
    ("rewards", ("reward", "rewards/<name>")),
    ("kl", ("kl", "kl_coef")),
    ("lengths", ("response_length", "truncated_frac")),
    ("entropy", ("entropy",)),
    ("preference pairs", ("rewards/accuracy", "rewards/margin", "rewards/chosen",
                          "rewards/rejected", "rewards/mean", "rewards/std")),
    ("optimizer", ("learning_rate", "grad_norm")),
)
"""The metrics ``plot_run`` draws, in panel order: glossary names (``types.METRICS``) grouped by
concern. ``rewards/<name>`` stands for every ``rewards/...`` metric present that no other entry
names (the reward components and evaluation scorers: ``rewards/reward_model``, ``rewards/gold``,
a reward function's name), sorted by name. A metric the rows do not hold is left out."""

MAX_COLUMNS = 4
"""Panels per row of a ``plot_run`` figure; more metrics wrap onto further rows."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_plot_keys(rows: Sequence[Mapping]) -> list[str]:
    """The panels ``plot_run`` draws for ``rows``: the ``PLOT_GROUPS`` metrics that some row
    holds as a number, in ``PLOT_GROUPS`` order."""
    present = {k for row in rows for k, v in row.items() if _is_number(v)}
    named = {key for _, group in PLOT_GROUPS for key in group}
    keys: list[str] = []
    for _, group in PLOT_GROUPS:
        for key in group:
            if key.endswith("/<name>"):
                prefix = key[: -len("<name>")]
                keys += sorted(k for k in present if k.startswith(prefix) and k not in named)
            elif key in present:
                keys.append(key)
    return keys


def _save(fig, path: str) -> str:
    """Write ``fig`` as a PNG at ``path`` atomically (temp file beside it, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # the temp name has no .png suffix to infer from
    return path


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _run_panel(ax, rows: Sequence[Mapping], key: str) -> None:
    """One metric against the step: one line per ``stage`` (a combined experiment file holds
    several), non-finite values left out and counted in the title."""
    series: dict[str | None, list[tuple[float, float]]] = {}
    bad = 0
    for row in rows:
        value, step = row.get(key), row.get("step")
        if not (_is_number(value) and _is_number(step)):
            continue
        if not math.isfinite(value):
            bad += 1
            continue
        stage = row.get("stage")
        series.setdefault(None if stage is None else str(stage), []).append((step, value))
    for stage, pts in series.items():
        xs, ys = zip(*sorted(pts, key=lambda p: p[0]))
        ax.plot(xs, ys, marker="o" if len(xs) <= 60 else None, markersize=2.5, linewidth=1.2,
                label=stage)
    if not series:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center",
                va="center", color="gray")
    if len(series) > 1 or (series and None not in series):
        ax.legend(fontsize=7)
    ax.set_title(key + (f" ({bad} non-finite)" if bad else ""), fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _draw_run_figure(rows: Sequence[Mapping], keys: Sequence[str], path: str, title: str) -> str:
    ncols = min(MAX_COLUMNS, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    width, height = 4.0 * ncols, 3.0 * nrows + 0.5
    fig = _figure(figsize=(width, height))
    # Fixed margins in inches instead of a layout engine, which measures every tick label and
    # doubles the drawing time; the room fits tick labels such as "-0.0225" and the titles.
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.5 / height,
                        top=1 - 0.75 / height, wspace=0.32, hspace=0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        _run_panel(ax, rows, key)
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    fig.suptitle(title)
    return _save(fig, path)


def plot_run(run_dir: str) -> list[str]:
    """Draw ``run_dir/metrics.jsonl`` as ``run_dir/plots/train.png`` and ``eval.png``.

    Each figure has one panel per metric of ``PLOT_GROUPS`` that the split's rows hold
    (``run_plot_keys``), against the step, at most ``MAX_COLUMNS`` panels a row. A split with
    no such metric (no eval rows, say) gets no file; a missing or empty ``metrics.jsonl``
    writes nothing. Returns the paths written: ``[]`` on processes other than 0, which draw
    nothing. ``plots/`` must not be a link leading out of ``run_dir``.
    """
    if not is_main_process():
        return []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    rows = read_jsonl_metrics(metrics) if os.path.isfile(metrics) else []
    out_dir = os.path.join(run_dir, "plots")
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    written = []
    for split, label in (("train", "training"), ("eval", "evaluation")):
        split_rows = [r for r in rows if r.get("split") == split]
        keys = run_plot_keys(split_rows)
        if keys:
            check_inside(run_dir, out_dir, "plots")
            path = os.path.join(out_dir, f"{split}.png")
            written.append(_draw_run_figure(split_rows, keys, path, f"{name}: {label}"))
    return written


def plot_curves(rows: Sequence[Mapping], keys: Sequence[str], path: str, *,
                split: str | None = None, title: str = "", x: str = "step") -> str:
    """One panel per metric in ``keys`` (rows lacking a key are skipped); returns ``path``."""
    if not is_main_process():
        return path
    rows = [r for r in rows if split is None or r.get("split") == split]
    fig = _figure(figsize=(4.2 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r[x], r[key]) for r in rows if key in r and math.isfinite(float(r[key]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2)
        ax.set_xlabel(x)
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_xy(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
            xlabel: str, ylabel: str, title: str = "") -> str:
    """Each ``name -> (xs, ys)`` as a labelled line with markers; returns ``path``."""
    if not is_main_process():
        return path
    fig = _figure(figsize=(5.2, 3.8))
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3.5, linewidth=1.2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
