"""Run the ``*_vs_trl`` benchmarks and write a Markdown table and a bar chart of the ratios.

``python -m benchmarks.report`` runs every benchmark of ``BENCHMARKS`` in its own subprocess
(a fresh process each: no shared JAX caches, torch threads or compile listeners between them),
collects the one JSON line each prints, and writes to ``--out`` (default
``benchmarks/results``):

* ``results.jsonl``: the raw records, one per benchmark;
* ``report.md``: ours, TRL, ratio against the target, compile time, compiled programs (XLA
  compilations counted by a ``jax.monitoring`` listener during the warm-up; recompilations
  during the timed steps must be 0) and our per-phase breakdown;
* ``ratios.png``: the ratio per benchmark, with each target marked;
* ``<name>.log``: each run's stderr.

``--only dpo grpo`` runs a subset; ``--no-trl`` runs our side alone (ratios are then null and
the chart is skipped); ``--python`` picks the interpreter of the runs (e.g. the one with the
``bench`` extra installed); ``--from-results`` rewrites the table and chart from an existing
``results.jsonl`` without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

BENCHMARKS = {
    "dpo": "benchmarks.dpo_vs_trl",
    "grpo": "benchmarks.grpo_vs_trl",
    "ppo": "benchmarks.ppo_vs_trl",
    "sft": "benchmarks.sft_vs_trl",
}
"""Short name -> module (each prints one JSON line)."""


def run_one(module: str, *, python: str, no_trl: bool, log_path: str) -> dict:
    cmd = [python, "-m", module] + (["--no-trl"] if no_trl else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"benchmark\"")]
    if proc.returncode or not lines:
        return {"benchmark": module.rsplit(".", 1)[-1], "error": f"exit {proc.returncode}; "
                f"see {log_path}", "wall_s": round(time.perf_counter() - start, 1)}
    rec = json.loads(lines[-1])
    rec["wall_s"] = round(time.perf_counter() - start, 1)
    return rec


def _fmt(x) -> str:
    return "—" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _breakdown(rec: dict) -> str:
    parts = rec.get("ours_breakdown_s") or {}
    return ", ".join(f"{k} {v:g}" for k, v in parts.items()) or "—"


def markdown(records: list[dict]) -> str:
    head = ("| benchmark | unit | rlhf_jax | TRL | ratio (×) | target | met | compile s "
            "| compiled programs | recompiles in timed steps |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    rows, details = [], []
    for rec in records:
        if "error" in rec:
            rows.append(f"| {rec['benchmark']} | error: {rec['error']} |||||||||")
            continue
        ratio, target = rec.get("ratio"), rec.get("target_ratio")
        met = "—" if ratio is None else ("✅" if ratio >= target else "❌")
        rows.append(f"| `{rec['benchmark']}` | {rec['unit']} | {_fmt(rec['ours'])} | "
                    f"{_fmt(rec.get('trl'))} | **{_fmt(ratio)}** | ≥ {target:g} | {met} | "
                    f"{_fmt(rec['ours_compile_s'])} | {rec['ours_compiled_programs']} | "
                    f"{rec['ours_recompiles_timed']} |")
        details.append(f"- `{rec['benchmark']}`: our breakdown (s): {_breakdown(rec)}; "
                       f"compile by part (s): {rec.get('ours_compile_breakdown_s', '—')}; "
                       "jit cache sizes: "
                       f"{rec.get('ours_cache_sizes', rec.get('ours_step_cache_size'))}"
                       f"; wall {rec['wall_s']} s")
    versions = next((r["versions"] for r in records if "versions" in r), {})
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"# rlhf_jax vs TRL ({when})\n\nVersions: {versions}. Ratios are TRL time / our "
            f"time (higher is better for us).\n\n" + head + "\n".join(rows) + "\n\n"
            + "\n".join(details) + "\n")


def chart(records: list[dict], path: str) -> bool:
    recs = [r for r in records if r.get("ratio") is not None]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = [r["benchmark"].replace("_vs_trl", "") for r in recs]
    ratios = [r["ratio"] for r in recs]
    colors = ["tab:green" if r["ratio"] >= r["target_ratio"] else "tab:red" for r in recs]
    bars = ax.bar(names, ratios, color=colors, width=0.6)
    for i, r in enumerate(recs):
        ax.hlines(r["target_ratio"], i - 0.4, i + 0.4, colors="black", linestyles="--",
                  label="target" if i == 0 else None)
    ax.bar_label(bars, labels=[f"{x:.2f}×" for x in ratios], padding=2)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("speed-up over TRL (×)")
    ax.set_title("rlhf_jax vs TRL, same checkpoint and workload (CPU)")
    ax.legend(loc="upper left")
    ax.set_ylim(0, max(ratios + [r["target_ratio"] for r in recs]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None,
                   help="benchmarks to run (default: all)")
    p.add_argument("--no-trl", action="store_true", help="our side only (ratios null)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--from-results", action="store_true",
                   help="rebuild report.md and ratios.png from OUT/results.jsonl")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    records = []
    if a.from_results:
        with open(os.path.join(a.out, "results.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    for name in [] if a.from_results else a.only or list(BENCHMARKS):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rec = run_one(BENCHMARKS[name], python=a.python, no_trl=a.no_trl,
                      log_path=os.path.join(a.out, f"{name}.log"))
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if not a.from_results:
        with open(os.path.join(a.out, "results.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(a.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(records))
    if chart(records, os.path.join(a.out, "ratios.png")):
        print(f"wrote {a.out}/report.md and ratios.png", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
