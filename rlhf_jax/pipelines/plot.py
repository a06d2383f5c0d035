"""``rlhf-jax plot RUN_DIR [RUN_DIR ...]``: redraw the plots of finished or running stages.

Every stage draws ``plots/train.png`` and ``plots/eval.png`` from its ``metrics.jsonl`` when it
finishes (``train.plots.plot_run``); this command draws them again, for a run still in progress,
one stopped by a crash, or one made before plots existed. It reads only ``metrics.jsonl``, so it
needs no accelerator and loads no model. All directories are checked before anything is drawn:
one without ``metrics.jsonl`` is an error (exit 2) naming it.
"""

from __future__ import annotations

import argparse
import os
import sys

from rlhf_jax.train.plots import PLOT_GROUPS, plot_run

PROG = "rlhf-jax plot"


def _parser() -> argparse.ArgumentParser:
    groups = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in PLOT_GROUPS)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Redraw RUN_DIR/plots/train.png and eval.png from RUN_DIR/metrics.jsonl.",
        epilog=f"Panels, in order, for the metrics a run logged: {groups}.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a stage's output directory (the one holding metrics.jsonl)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Redraw ``RUN_DIR/plots/*.png`` for each ``RUN_DIR`` and print the paths written, one a
    line. Returns 0, or 2 (message on stderr) when a directory has no ``metrics.jsonl``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    missing = [d for d in args.run_dirs if not os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    for d in missing:
        print(f"{PROG}: error: {d!r} has no metrics.jsonl (not a run directory, or the run "
              f"has logged nothing yet)", file=sys.stderr)
    if missing:
        return 2
    for d in args.run_dirs:
        paths = plot_run(d)
        if not paths:
            print(f"{PROG}: {d}: metrics.jsonl holds no metric to plot", file=sys.stderr)
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
