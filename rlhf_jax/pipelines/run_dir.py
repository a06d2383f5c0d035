"""A stage's run directory: ``config.json`` (the run's identity, checked on resume), the exported
Hugging Face model and ``result.json``. Only process 0 writes; every write is atomic and never
goes through a link that leaves the directory (``rlhf_jax.fileio``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Mapping

from rlhf_jax import parallel
from rlhf_jax.data import Tokenizer
from rlhf_jax.data.tokenizer import generation_config
from rlhf_jax.fileio import atomic_write_json, check_inside
from rlhf_jax.models import ModelConfig, save_hf_checkpoint, save_peft_adapter
from rlhf_jax.pipelines.datasets import summarize_report
from rlhf_jax.train.adapters import Adapted
from rlhf_jax.train.checkpoint import check_writable
from rlhf_jax.train.plots import plot_run

NOT_IDENTITY = ("loop", "mesh", "logging")
"""Config blocks a restarted run may change: the loop (a finished run can be extended; the
schedule follows its length), the mesh (checkpoints are mesh-independent) and the sinks."""


def config_dict(value):
    """A config dataclass as plain JSON-able data (nested blocks as nested objects)."""
    if dataclasses.is_dataclass(value):
        return {f.name: config_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): config_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_dict(v) for v in value]
    return value


def write_json(path: str, obj) -> None:
    """Atomic JSON write (``fileio.atomic_write_json``) by process 0 only."""
    if parallel.is_main_process():
        atomic_write_json(path, obj)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def with_new_defaults(old: Mapping, cfg) -> dict:
    """``old`` (a saved ``config_dict``) with the fields it lacks filled in from ``cfg``, where
    ``cfg`` holds the field's default: a run saved before a field existed resumes unless the
    new config sets that field to something else. Nested blocks are filled the same way."""
    out = dict(old)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in out:
            if _field_default(f) == value:
                out[f.name] = config_dict(value)
        elif dataclasses.is_dataclass(value) and isinstance(out[f.name], Mapping):
            out[f.name] = with_new_defaults(out[f.name], value)
    return out


def _has_checkpoint(output_dir: str) -> bool:
    """Whether a step was saved (``checkpoints/<step>``): only then is there a run to resume."""
    ckpt = os.path.join(output_dir, "checkpoints")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def prepare_run_dir(cfg, output_dir: str, *, ignore: Iterable[str] = NOT_IDENTITY,
                    checkpoints: bool = True) -> str:
    """Create ``output_dir`` and write ``config.json``; refuse to resume under another config,
    or (``checkpoints``) a ``checkpoints/`` folder that cannot be written, before anything is
    compiled.

    A restarted run (same directory) must use the same config except for the blocks in
    ``ignore``, once it has saved a checkpoint; a run that never saved one (it stopped on an
    error, say) has nothing to resume, and the new config replaces the old. Only process 0
    writes the file.
    """
    os.makedirs(output_dir, exist_ok=True)
    if checkpoints:
        check_writable(os.path.join(output_dir, "checkpoints"))
    path = os.path.join(output_dir, "config.json")
    check_inside(output_dir, path, "config.json")
    new = {"kind": type(cfg).__name__} | config_dict(cfg)
    if os.path.exists(path) and _has_checkpoint(output_dir):
        with open(path, encoding="utf-8") as f:
            old = with_new_defaults(json.load(f), cfg)
        diff = sorted(k for k in set(old) | set(new)
                      if k not in ignore and old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"{output_dir} holds a run with a different config (fields {diff}); "
                             f"choose another output_dir or delete the old run")
    write_json(path, new)
    return output_dir


def export_model(directory: str, config: ModelConfig, params, tokenizer: Tokenizer, *,
                 generation: Mapping[str, Any] | None = None) -> str:
    """Write params as a Hugging Face checkpoint plus the tokenizer files into ``directory``.

    ``generation_config.json`` holds ``generation`` (the base checkpoint's, so its sampling
    defaults such as temperature and top_p are kept) with the tokenizer's bos/eos/pad ids in
    place of its own; ``config.json`` gets those ids too, so ``transformers``' ``generate()``
    stops at every EOS id the sampler stops at (a chat model's end-of-turn token included).
    ``directory`` must not be a symlink leading out of its parent (the run directory)."""
    check_inside(os.path.dirname(os.path.abspath(directory)), directory, "the model directory")
    host = parallel.fetch(params)  # every process joins the gather; process 0 writes
    if parallel.is_main_process():
        tokenizer.save(directory)
        save_hf_checkpoint(directory, config, host,
                           generation_config=generation_config(tokenizer, generation))
    parallel.barrier(f"export {directory}")  # the next stage, on every process, reads it
    return directory


def exported_params(adapted: Adapted | None, params):
    """What ``model/`` holds: ``params``, or for a LoRA run (``params`` the trainable tree) the
    base with the adapter merged in (``W + s A B``; a QLoRA base dequantised first)."""
    return params if adapted is None else adapted.merged(params)


def export_adapter(directory: str, adapted: Adapted, trainable) -> str:
    """Write a LoRA run's adapter alone in PEFT's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``: ``peft.PeftModel.from_pretrained`` loads it on the base)."""
    check_inside(os.path.dirname(os.path.abspath(directory)), directory, "the adapter directory")
    host = parallel.fetch(adapted.adapter(trainable))
    if parallel.is_main_process():
        save_peft_adapter(directory, adapted.model, host)
    parallel.barrier(f"export {directory}")
    return directory


def last_rows(run_dir: str) -> dict:
    """The last train and eval rows of ``run_dir/metrics.jsonl`` (None when absent)."""
    rows = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return {split: next((r for r in reversed(rows) if r.get("split") == split), None)
            for split in ("train", "eval")}


def finish_run(run_dir: str, config: ModelConfig, params, tokenizer: Tokenizer, state, *,
               total_steps: int, generation: Mapping[str, Any] | None = None,
               **extra) -> dict:
    """Export the trained model to ``run_dir/model`` and write ``result.json``: paths, the step,
    ``complete`` (False when a SIGTERM stopped the run before ``total_steps``: the exported model
    is the checkpointed partial one, and a chain of stages should stop, not go on from it), and
    the last train and eval rows of ``metrics.jsonl`` (read from disk, so a stage that was
    already complete and only resumed reports the same figures). ``generation``: the base
    checkpoint's generation config, see ``export_model``."""
    model_dir = export_model(os.path.join(run_dir, "model"), config, params, tokenizer,
                             generation=generation)
    steps = int(state.step)
    result = {"run_dir": run_dir, "model_dir": model_dir, "steps": steps,
              "complete": steps >= total_steps} | last_rows(run_dir) | extra
    write_json(os.path.join(run_dir, "result.json"), result)
    lost = summarize_report(extra.get("data"))
    if lost and parallel.is_main_process():
        print(f"{run_dir}: finished on data that lost or cut rows:\n{lost}", file=sys.stderr)
    result["plots"] = plot_run(run_dir)  # plots/train.png, eval.png (process 0)
    parallel.barrier(f"finish {run_dir}")
    return result
