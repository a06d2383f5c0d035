"""The ``rlhf-jax STAGE`` command line: config files under flags, errors that name the field, and
standard-format runs on a tiny ChatML checkpoint (every stage on conversational data is the
README's commands, tests/test_readme.py; the loaders' stage x format matrix is
tests/pipelines/test_formats_matrix.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import cli
from rlhf_jax.pipelines import sft
from rlhf_jax.pipelines.config import DataConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- config files
def test_config_file_values_under_flags(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("data:\n  train: a.jsonl\n  batch_size: 4\noutput_dir: runs/x\n"
                    "optimizer:\n  learning_rate: 1\nmodel:\n  path: ckpt\n")
    cfg = cli.parse(sft.SFTConfig, ["--config", str(path), "--data.batch-size", "2"])
    assert cfg.data == DataConfig(train="a.jsonl", batch_size=2)
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model.path == "ckpt" and cfg.output_dir == "runs/x"
    (tmp_path / "sft.json").write_text(json.dumps({"data": {"train": "b.jsonl"},
                                                   "output_dir": "o"}))
    cfg = cli.parse(sft.SFTConfig, [f"--config={tmp_path / 'sft.json'}"])
    assert cfg.data.train == "b.jsonl" and cfg.data.max_length == 1024


@pytest.mark.parametrize("text, message", [
    ("data:\n  trian: a.jsonl\n", "unknown field 'data.trian'; data has ['train',"),
    ("data:\n  train: a.jsonl\n  batch_size: eight\n", "field 'data.batch_size': expected "
                                                        "<class 'int'>, got 'eight'"),
    ("- 1\n- 2\n", "the file must be a mapping of fields, got list"),
    ("output_dir: [1]\n", "field 'output_dir': expected"),
])
def test_config_file_errors_name_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cli.ConfigFileError) as info:
        cli.parse(sft.SFTConfig, ["--config", str(path)])
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_config_file_over_an_experiment_default(tmp_path):
    base = sft.SFTConfig(data=DataConfig(train="t.jsonl", max_length=48), output_dir="o")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 3\n")
    cfg = cli.parse(sft.SFTConfig, ["--config", str(path)], default=base)
    assert (cfg.data.train, cfg.data.max_length, cfg.data.batch_size) == ("t.jsonl", 48, 3)


def test_a_missing_required_field_is_a_tyro_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse(sft.SFTConfig, ["--output-dir", "o"])
    assert info.value.code == 2
    assert "--data.train" in capsys.readouterr().err


def test_usage_and_unknown_stage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "stages: sft, reward-model, dpo, grpo, ppo, distill, best-of-n" in out
    assert cli.main(["sftt"]) == 2
    assert "unknown stage 'sftt'" in capsys.readouterr().err


def test_installed_command_and_module_show_field_docs():
    """``rlhf-jax`` (the console script ``pip install -e .`` wrote), ``python -m rlhf_jax`` and
    ``python -m rlhf_jax.pipelines.STAGE`` (``python -m rlhf_jax`` runs the same ``main``)."""
    exe = pathlib.Path(sys.executable).with_name("rlhf-jax")
    assert exe.is_file(), "pip install -e . did not install the rlhf-jax command"
    for cmd in ([str(exe), "grpo", "--help"], [sys.executable, "-m", "rlhf_jax.pipelines.dpo",
                                                "--help"]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=os.environ | {"COLUMNS": "200"})
        assert proc.returncode == 0, proc.stderr
        assert "Examples per optimizer step" in proc.stdout  # DataConfig.batch_size's doc
        assert "(default: 1024)" in proc.stdout


# ---------------------------------------------------------------------------- stage runs
def _yaml(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _run(stage: str, args: list[str]) -> dict:
    assert cli.main([stage, *args]) == 0
    return json.loads(pathlib.Path(args[args.index("--output-dir") + 1], "result.json")
                      .read_text())


COMMON = ("optimizer:\n  warmup_steps: 0\n  learning_rate: 0.001\n"
          "loop:\n  total_steps: 2\n  log_every: 1\n  save_every: 2\n  eval_every: 0\n"
          "logging:\n  progress: false\n  console: false\n  tensorboard: false\nmesh: null\n")


def test_a_standard_format_runs_from_the_command_line(chat_world, tmp_path):
    """DPO on standard implicit-prompt preferences (plain strings; every stage on
    conversational data: tests/test_readme.py runs the README's commands; SFT on text:
    tests/pipelines/test_data_report.py)."""
    small = "  max_length: 64\n  max_prompt_length: 32\n  batch_size: 4\n"
    cfg = _yaml(tmp_path / "dpo.yaml", f"data:\n  train: {chat_world['preference_implicit']}\n"
                f"{small}policy:\n  path: {chat_world['ckpt']}\n" + COMMON)
    result = _run("dpo", ["--config", cfg, "--output-dir", str(tmp_path / "dpo")])
    assert result["complete"] and result["steps"] == 2


def test_a_config_error_names_the_fields_and_exits_2(chat_world, tmp_path, capsys):
    """A check in a config's ``__post_init__`` fails while tyro builds it: tyro prints it and
    exits 2; a data error found by the run is one line and exit 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(["sft", "--data.train", chat_world["text"], "--output-dir", str(tmp_path),
                  "--data.batch-size", "3", "--micro-batches", "2"])
    assert info.value.code == 2
    assert "data.batch_size 3 is not divisible by micro_batches 2" in capsys.readouterr().err
    rc = cli.main(["sft", "--data.train", chat_world["preference"], "--output-dir",
                   str(tmp_path / "o"), "--model.path", chat_world["ckpt"]])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-jax sft: error: ")
    assert "SFT reads the formats ['text', 'prompt_completion', 'messages']" in err[0]
