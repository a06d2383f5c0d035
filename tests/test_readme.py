"""The README's promises: its notebook example runs (without loading Flax, Optax or Orbax), the
demo main job runs, and CI's script reads the README's test command."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HEAVY = ("flax", "optax", "orbax")


def _block(marker: str, lang: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1)


def _run_python(code: str, tmp_path, *, pure: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repo root; ``pure``: no Flax/Optax/Orbax."""
    script = tmp_path / "snippet.py"
    script.write_text(code)
    check = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__'); "
    if pure:
        check += (f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); "
                  "assert not heavy, f'pure layer imported {heavy}'")
    return subprocess.run([sys.executable, "-c", check, str(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_notebook_example_runs_without_heavy_imports(tmp_path):
    proc = _run_python(_block("notebook-example", "python"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DPO loss" in proc.stdout and "PPO loss" in proc.stdout


def test_models_example_runs(tmp_path):
    proc = _run_python(_block("models-example", "python"), tmp_path, pure=False)
    assert proc.returncode == 0, proc.stderr
    assert "(8, 16)" in proc.stdout


def test_ops_and_losses_import_alone(tmp_path):
    proc = _run_python("import rlhf_jax.ops, rlhf_jax.losses\n", tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_readme_opens_with_the_two_commands():
    main = _block("main-command", "bash")
    test = _block("test-command", "bash")
    assert "python -m experiments." in main and "pip install" in main
    assert "pytest" in test and "pip install" in test
    first_bash = README.index("```bash")
    assert README.index("<!-- main-command -->") < first_bash


def test_ci_runs_the_readme_test_command():
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-command"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == _block("test-command", "bash").strip()


def test_demo_main_job_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.pure_math_demo", "--batch", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("dpo_loss", "ppo_policy_loss", "grpo_loss (Dr.GRPO)", "jsd_distill_loss"):
        assert name in proc.stdout
    assert "nan" not in proc.stdout.lower()


def test_pipeline_example_runs(tmp_path):
    """The README's Python pipeline example, on a tiny checkpoint, tokenizer and dataset made
    here (paths substituted, the run shortened to 12 steps of 64-token rows)."""
    import json

    from rlhf_jax.data import train_bpe_tokenizer
    from rlhf_jax.models import get_preset, init_model, save_hf_checkpoint

    rows = [{"prompt": f"Say {w}.", "completion": f" {w} {w}."} for w in
            ("sea", "sun", "tree", "bird", "rain", "snow", "wind", "moon")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer([r["prompt"] + r["completion"] for r in rows] * 4, vocab_size=300)
    tok.save(str(tmp_path / "tok"))
    model, params = init_model(get_preset("toy-1m", vocab_size=tok.vocab_size, heads=("lm",),
                                          hidden_size=32, intermediate_size=64, num_layers=1,
                                          num_heads=2, num_kv_heads=1),
                               __import__("jax").random.PRNGKey(0))
    save_hf_checkpoint(str(tmp_path / "ckpt"), model.config, params)
    code = _block("pipeline-example", "python")
    for old, new in (("train.jsonl", tmp_path / "train.jsonl"), ("path/to/tokenizer_dir",
                     tmp_path / "tok"), ("path/to/hf_checkpoint", tmp_path / "ckpt"),
                     ("runs/my_sft", tmp_path / "run"), ("total_steps=1000", "total_steps=12"),
                     ("max_length=1024", "max_length=64")):
        assert str(old) in code, old
        code = code.replace(str(old), str(new))
    code += "\nassert result['complete'] and result['steps'] == 12, result\n"
    proc = _run_python(code, tmp_path, pure=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
