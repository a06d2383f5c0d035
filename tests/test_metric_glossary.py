"""The metric glossary (``types.METRICS``): what it accepts, and that the experiments' plots and
summaries read names from it. The pipelines' own rows are checked by
``tests/pipelines/common.assert_run_outputs`` on every pipeline test run."""

from __future__ import annotations

import pathlib
import re

from rlhf_jax.types import METRICS, is_glossary_metric

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_names_and_families():
    assert is_glossary_metric("kl") and is_glossary_metric("rewards/accuracy")
    assert is_glossary_metric("rewards/gold")  # a family: any reward component's name
    assert is_glossary_metric("policy/clip_frac") and is_glossary_metric("value/returns")
    for bad in ("score", "kl_to_ref", "reward/gold", "accuracy", "clip_frac", "nope/x"):
        assert not is_glossary_metric(bad), bad
    assert all(doc.strip() for doc in METRICS.values())


def test_experiments_read_glossary_names():
    """Every metric name an experiment plots or reads from a metrics row is a glossary name."""
    used = set()
    for path in (ROOT / "experiments").glob("*.py"):
        text = path.read_text()
        for block in re.findall(r"plot_curves\([^\]]*\[([^\]]*)\]", text):
            used |= set(re.findall(r'"([^"]+)"', block))
        used |= set(re.findall(r'r\["([a-z_/]+)"\]', text))
        used |= set(re.findall(r"\['([a-z_/]+)'\]", text))
    used -= {"stage", "split", "step", "prompt", "answer", "model_dir", "run_dir", "eval",
             "train", "gold", "kl_bound", "proxy", "n", "output", "length", "rows", "texts",
             "forward_kl_", "agreement_ceiling", "best_gold", "paths", "stats", "steps",
             "complete", "gold/best_mean", "gold/sample_mean"}  # best-of-N result keys
    assert used, "the scan found nothing: the regexes are stale"
    unknown = sorted(k for k in used if not is_glossary_metric(k))
    assert not unknown, unknown
