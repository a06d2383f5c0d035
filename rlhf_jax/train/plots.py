"""PNG plots of logged metrics (matplotlib with the non-interactive Agg backend).

``plot_curves`` draws metrics against the step from ``metrics.jsonl`` rows; ``plot_xy`` draws
one metric against another (gold reward against KL, say) for one or several runs. In a
multi-process run only process 0 draws (the others return the path without writing).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from rlhf_jax.parallel import is_main_process


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: Sequence[Mapping], keys: Sequence[str], path: str, *,
                split: str | None = None, title: str = "", x: str = "step") -> str:
    """One panel per metric in ``keys`` (rows lacking a key are skipped); returns ``path``."""
    if not is_main_process():
        return path
    plt = _pyplot()
    rows = [r for r in rows if split is None or r.get("split") == split]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_xy(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, *,
            xlabel: str, ylabel: str, title: str = "") -> str:
    """Each ``name -> (xs, ys)`` as a labelled line with markers; returns ``path``."""
    if not is_main_process():
        return path
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
