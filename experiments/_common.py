"""Helpers shared by the experiment modules: task data and tokenizer, sampling text from a
checkpoint, win rates, combined metrics, plots and the summary table."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.data import Tokenizer, decode_completions, train_bpe_tokenizer
from rlhf_jax.fileio import atomic_write
from rlhf_jax.parallel import is_main_process
from rlhf_jax.pipelines import DataConfig, ModelSpec
from rlhf_jax.pipelines.datasets import load_prompts
from rlhf_jax.pipelines.run_dir import write_json
from rlhf_jax.pipelines.setup import load_model
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import read_jsonl_metrics


def main_first(fn: Callable[[], object]):
    """``fn()`` run by process 0 alone (it writes files the stages then read), its JSON-able
    result handed to every process; the others wait for it. Just ``fn()`` in one process."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    main = is_main_process()
    payload = json.dumps(fn() if main else None).encode()
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buf = np.frombuffer(payload, np.uint8) if main else np.zeros(size, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def tokenizer_for(run_dir: str, texts: Sequence[str], *, vocab_size: int) -> str:
    """Train (once) a byte-level BPE tokenizer on ``texts`` into ``run_dir/tokenizer``."""
    path = os.path.join(run_dir, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        train_bpe_tokenizer(texts, vocab_size=vocab_size).save(path)
    return path


def model_overrides(cfg) -> dict:
    """The model-shape fields every experiment config carries, as ``ModelSpec.overrides``."""
    return {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                         "num_heads", "num_kv_heads")}


def sample_texts(model_dir: str, tokenizer_dir: str, prompts_path: str, *, n: int,
                 max_prompt_length: int, max_new_tokens: int, temperature: float, seed: int,
                 batch: int = 64) -> tuple[list[dict], list[list[str]]]:
    """``n`` completions per prompt from the checkpoint in ``model_dir`` (fixed key)."""
    tok = Tokenizer.load(tokenizer_dir)
    prompts, rows = load_prompts(prompts_path, DataConfig(
        train=prompts_path, max_prompt_length=max_prompt_length), tok)
    model, params = load_model(ModelSpec(path=model_dir), heads=("lm",),
                               vocab_size=tok.vocab_size, seed=seed)
    sample = make_sampler(model, SamplingConfig(max_new_tokens=max_new_tokens,
                                                eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                                temperature=temperature, n=n))
    key, texts = jax.random.PRNGKey(seed), []
    for i, s in enumerate(range(0, len(rows), batch)):
        idx = np.arange(s, s + batch) % len(rows)
        out = sample(params, prompts.tokens[idx], prompts.mask[idx], jax.random.fold_in(key, i))
        flat = decode_completions(tok, out.tokens, out.mask)
        real = min(batch, len(rows) - s)
        texts += [flat[j * n:(j + 1) * n] for j in range(real)]
    return rows, texts


def win_rate(score: Callable[[str, str], float], rows: Sequence[dict],
             a: Sequence[Sequence[str]], b: Sequence[Sequence[str]]) -> float:
    """P(score(a) > score(b)) over prompts and paired samples; ties count one half."""
    wins = []
    for row, xs, ys in zip(rows, a, b):
        for x, y in zip(xs, ys):
            sx, sy = score(row["prompt"], x), score(row["prompt"], y)
            wins.append(1.0 if sx > sy else 0.5 if sx == sy else 0.0)
    return float(np.mean(wins))


def mean_score(score: Callable[[str, str], float], rows, texts) -> float:
    return float(np.mean([score(r["prompt"], t) for r, ts in zip(rows, texts) for t in ts]))


def write_samples(path: str, rows, texts, scorers: Mapping[str, Callable[[str, str], float]],
                  limit: int = 32) -> None:
    if not is_main_process():
        return
    lines = []
    for row, ts in list(zip(rows, texts))[:limit]:
        rec = {"prompt": row["prompt"], "completion": ts[0]}
        rec |= {k: round(float(fn(row["prompt"], ts[0])), 4) for k, fn in scorers.items()}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write(path, "".join(lines))


def combine_metrics(run_dir: str, stages: Sequence[str]) -> list[dict]:
    """Concatenate the stages' ``metrics.jsonl`` into ``run_dir/metrics.jsonl`` (with a
    ``stage`` field) and return the rows."""
    rows = []
    for stage in stages:
        path = os.path.join(run_dir, stage, "metrics.jsonl")
        if os.path.exists(path):
            rows += [{"stage": stage} | r for r in read_jsonl_metrics(path)]
    if not is_main_process():
        return rows
    atomic_write(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n"
                                                                 for r in rows))
    return rows


def completed(result):
    """A stage's ``result``, or ``SystemExit`` when a SIGTERM stopped it before its last step:
    its checkpoint is saved, and the next stage must not start from the partial model (the same
    command resumes the chain where it stopped)."""
    if isinstance(result, dict) and result.get("complete") is False:
        raise SystemExit(f"{result['run_dir']}: stopped at step {result['steps']} by SIGTERM, "
                         f"checkpoint saved; run the same command again to resume")
    return result


class Timer:
    """Wall time per named stage; each stage's result goes through ``completed``."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t0
        return completed(out)


def write_summary(path: str, title: str, sections: Mapping[str, Mapping[str, object]],
                  notes: Sequence[str] = ()) -> None:
    """``summary.md``: one two-column table per section, also printed (by process 0)."""
    lines = [f"# {title}", ""]
    for name, table in sections.items():
        lines += [f"## {name}", "", "| quantity | value |", "|---|---|"]
        for k, v in table.items():
            v = f"{v:.4g}" if isinstance(v, float) else v
            lines.append(f"| {k} | {v} |")
        lines.append("")
    lines += list(notes)
    if not is_main_process():
        return
    atomic_write(path, "\n".join(lines) + "\n")
    print("\n".join(lines))


def save_config(run_dir: str, cfg) -> None:
    os.makedirs(run_dir, exist_ok=True)
    if not is_main_process():
        return
    write_json(os.path.join(run_dir, "experiment_config.json"),
               {"kind": type(cfg).__name__} | dataclasses.asdict(cfg))
