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


SHORT = ["--loop.total-steps", "2", "--loop.save-every", "2", "--loop.log-every", "1",
         "--optimizer.warmup-steps", "0", "--logging.no-progress", "--logging.no-console",
         "--data.max-length", "64", "--data.max-prompt-length", "32", "--data.batch-size", "4"]
"""Appended to each README command: a 2-step run of short rows (the flags override the
README's and the YAML's values; nothing else is changed)."""
STAGE_SHORT = {"grpo": ["--sampling.max-new-tokens", "8", "--algorithm.group-size", "2"],
               "ppo": ["--sampling.max-new-tokens", "8", "--algorithm.num-minibatches", "2"],
               "best-of-n": ["--sampling.max-new-tokens", "8", "--group-size", "2",
                             "--data.max-prompt-length", "32", "--data.batch-size", "4",
                             "--no-progress"]}


def _with_short(args: list[str]) -> list[str]:
    """``args`` with the shortening flags placed before the first subcommand token (tyro reads
    a block's flags before the subcommands that follow it) and ``mesh:none`` (one device)."""
    stage = args[0]
    if stage == "plot":
        return args
    extra = STAGE_SHORT.get(stage, []) + (SHORT if stage != "best-of-n" else [])
    subs = [i for i, a in enumerate(args) if ":" in a and not a.startswith("-")
            and not args[i - 1].startswith("--rewards.functions")]
    cut = subs[0] if subs else len(args)
    mesh = [] if stage == "best-of-n" else ["mesh:none"]
    return args[:cut] + extra + args[cut:] + mesh


def _cli_world(chat_world, tmp_path, monkeypatch):
    """The files the README's command blocks name: ``my-model``, ``data/``, ``my_rewards.py``,
    ``sft.yaml``; the working directory moves there."""
    import shutil

    shutil.copytree(chat_world["ckpt"], tmp_path / "my-model")
    (tmp_path / "data").mkdir()
    for name, src in (("chat", "messages"), ("prefs", "preference_chat"),
                      ("prompts", "prompt_chat")):
        shutil.copy(chat_world[src], tmp_path / "data" / f"{name}.jsonl")
    (tmp_path / "my_rewards.py").write_text(
        "def correct(prompts, completions, answer, **kw):\n"
        "    return [float(c[0]['content'].strip() == a) for c, a in zip(completions, answer)]\n")
    (tmp_path / "sft.yaml").write_text(_block("cli-yaml", "yaml"))
    monkeypatch.chdir(tmp_path)


def test_lora_commands_run(chat_world, tmp_path, monkeypatch):
    """The README's LoRA commands, verbatim, each shortened to 2 steps: the adapter-only
    checkpoints and the PEFT export chain from SFT into DPO; GRPO trains on an NF4 base."""
    import json
    import shlex

    from rlhf_jax import cli

    _cli_world(chat_world, tmp_path, monkeypatch)
    for line in [ln for ln in _block("lora-commands", "bash").splitlines() if ln.strip()]:
        assert cli.main(_with_short(shlex.split(line)[1:])) == 0, line
    for run in ("sft-lora", "dpo-lora", "grpo-qlora"):
        result = json.loads((tmp_path / "runs" / run / "result.json").read_text())
        assert result["complete"] and result["steps"] == 2, run
        assert (tmp_path / "runs" / run / "adapter" / "adapter_config.json").is_file(), run


def test_cli_commands_run(chat_world, tmp_path, monkeypatch):
    """The README's "your own model and data" commands, verbatim, in order, on a tiny ChatML
    checkpoint (``my-model``) and conversational data made here, each shortened to 2 steps."""
    import json
    import shlex

    from rlhf_jax import cli

    _cli_world(chat_world, tmp_path, monkeypatch)
    lines = [ln for ln in _block("cli-commands", "bash").splitlines() if ln.strip()]
    assert {shlex.split(ln)[1] for ln in lines} == set(cli.STAGES) | {"plot"}
    for line in lines:
        args = shlex.split(line)
        assert args[0] == "rlhf-jax"
        assert cli.main(_with_short(args[1:])) == 0, line
    for run in ("sft", "rm", "dpo", "grpo", "ppo", "distill"):
        result = json.loads((tmp_path / "runs" / run / "result.json").read_text())
        assert result["complete"] and result["steps"] == 2, run
    assert (tmp_path / "runs" / "bon" / "best_of_n.jsonl").is_file()
    assert (tmp_path / "runs" / "dpo" / "plots" / "train.png").is_file()
