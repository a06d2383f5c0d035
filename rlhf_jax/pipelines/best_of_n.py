"""Best-of-N rejection sampling: sample ``n`` completions per prompt, score them with a reward
model, keep the best as SFT data (Nakano et al. 2021; Touvron et al. 2023, "rejection sampling").

Output: ``<output_dir>/best_of_n.jsonl`` in the ``prompt``/``completion`` format (plus the
chosen ``score`` and the group's mean), ready for ``pipelines.sft``; and ``result.json`` with the
mean best and mean average score (the selection gain), and for every extra reward function
given to ``run`` (a task's gold scorer, say) its mean on the selected and on all samples, so the
gain can be checked against a reward the selector never saw.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np

from rlhf_jax.data import Tokenizer
from rlhf_jax import parallel
from rlhf_jax.data.jsonl import write_jsonl
from rlhf_jax.models import sequence_rewards
from rlhf_jax.pipelines.common import (ModelSpec, check_sequence_fits, load_model,
                                       prepare_run_dir, write_json)
from rlhf_jax.pipelines.rollouts import (RewardFn, call_reward_fns, decode_completions,
                                         load_prompts)
from rlhf_jax.sampling import SamplingConfig, make_sampler


@dataclasses.dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    """Best-of-N sampling against a reward model."""

    prompts: str
    tokenizer: str
    policy: ModelSpec
    reward_model: ModelSpec
    output_dir: str = "runs/best_of_n"
    n: int = 8
    max_prompt_length: int = 16
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    prompts_per_batch: int = 16
    progress: bool = True
    skip_invalid: bool = False
    """Skip (and count) malformed prompt rows instead of stopping at the first."""
    on_overflow: str = "error"
    """Prompts longer than ``max_prompt_length``: ``error`` or ``skip`` (never truncated)."""
    seed: int = 0

    def __post_init__(self):
        if self.n < 1 or self.prompts_per_batch < 1:
            raise ValueError("n and prompts_per_batch must be >= 1")


def select_best(scores: np.ndarray, n: int) -> np.ndarray:
    """Index (into the flat ``[P * n]`` array) of each prompt's highest score; ties go to the
    first sample."""
    groups = np.asarray(scores).reshape(-1, n)
    return np.arange(groups.shape[0]) * n + np.argmax(groups, axis=1)


def run(cfg: BestOfNConfig, *, eval_rewards: Mapping[str, RewardFn] | None = None) -> dict:
    """Sample, score, select and write; returns the summary (also in ``result.json``)."""
    run_dir = prepare_run_dir(cfg, cfg.output_dir, ignore=())
    tokenizer = Tokenizer.load(cfg.tokenizer)
    prompts, rows = load_prompts(cfg.prompts, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                 skip_invalid=cfg.skip_invalid, on_overflow=cfg.on_overflow)
    v = tokenizer.vocab_size
    policy, params = load_model(cfg.policy, heads=("lm",), vocab_size=v, seed=cfg.seed)
    rm, rm_params = load_model(cfg.reward_model, heads=("reward",), vocab_size=v, seed=cfg.seed)
    check_sequence_fits({"policy": policy.config, "reward": rm.config},
                        max_prompt_length=cfg.max_prompt_length,
                        max_new_tokens=cfg.max_new_tokens)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.n)
    sample = make_sampler(policy, sampling)
    score = jax.jit(lambda p, *a: sequence_rewards(rm, p, *a))
    key = jax.random.PRNGKey(cfg.seed)
    n_prompts, b = len(rows), cfg.prompts_per_batch
    out_rows, best_scores, mean_scores = [], [], []
    extra_best: dict[str, list] = {k: [] for k in (eval_rewards or {})}
    extra_all: dict[str, list] = {k: [] for k in (eval_rewards or {})}
    bar = None
    if cfg.progress and parallel.is_main_process():
        from tqdm.auto import tqdm
        bar = tqdm(total=n_prompts, desc="best-of-n", dynamic_ncols=True)
    for i, start in enumerate(range(0, n_prompts, b)):
        idx = np.arange(start, start + b) % n_prompts  # last batch padded by wrapping
        real = min(b, n_prompts - start)
        out = sample(params, prompts.tokens[idx], prompts.mask[idx], jax.random.fold_in(key, i))
        s = np.asarray(score(rm_params, out.prompt_tokens, out.prompt_mask, out.tokens,
                             out.mask))
        best = select_best(s, cfg.n)[:real]
        texts = decode_completions(tokenizer, out.tokens, out.mask)
        groups = s.reshape(-1, cfg.n)[:real]
        for j, flat in enumerate(best):
            row = rows[idx[j]]
            out_rows.append({"prompt": row["prompt"], "completion": texts[flat],
                             "score": float(s[flat]), "group_mean_score":
                                 float(groups[j].mean())})
        best_scores += [float(s[f]) for f in best]
        mean_scores += [float(g.mean()) for g in groups]
        if eval_rewards:
            rep = np.repeat(idx[:real], cfg.n)
            cols = {c: [rows[k].get(c) for k in rep] for c in rows[0] if c != "prompt"}
            vals = call_reward_fns(eval_rewards, [rows[k]["prompt"] for k in rep],
                                   texts[:real * cfg.n], cols)
            for name, v_ in vals.items():
                extra_all[name] += list(v_)
                extra_best[name] += [float(v_[f]) for f in best]
        if bar is not None:
            bar.update(real)
    if bar is not None:
        bar.close()
    path = os.path.join(run_dir, "best_of_n.jsonl")
    main = parallel.is_main_process()  # every process computed the same rows; one writes
    if main:
        write_jsonl(path, out_rows)
    result = {"output": path, "prompts": n_prompts, "n": cfg.n,
              "reward_model/best_mean": float(np.mean(best_scores)),
              "reward_model/sample_mean": float(np.mean(mean_scores))}
    for name in extra_best:
        result[f"{name}/best_mean"] = float(np.mean(extra_best[name]))
        result[f"{name}/sample_mean"] = float(np.mean(extra_all[name]))
    if main:
        write_json(os.path.join(run_dir, "result.json"), result)
    parallel.barrier(f"best_of_n {run_dir}")  # the next stage reads the file
    return result
