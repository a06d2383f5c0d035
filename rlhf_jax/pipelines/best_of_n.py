"""Best-of-N rejection sampling: sample ``group_size`` (N) completions per prompt, score them
with a reward model, keep the best as SFT data (Nakano et al. 2021; Touvron et al. 2023,
"rejection sampling").

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

from rlhf_jax import parallel
from rlhf_jax.data import decode_completions, write_jsonl
from rlhf_jax.models import sequence_rewards
from rlhf_jax.pipelines.config import DataConfig, GenerationConfig, ModelSpec, RewardConfig
from rlhf_jax.pipelines.datasets import load_prompts
from rlhf_jax.pipelines.run_dir import prepare_run_dir, write_json
from rlhf_jax.pipelines.setup import (check_sequence_fits, load_model, load_tokenizer,
                                      with_adapter)
from rlhf_jax.rewards import RewardFn, call_reward_fns
from rlhf_jax.sampling import SamplingConfig, make_sampler


@dataclasses.dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    """Best-of-N sampling against a reward model."""

    data: DataConfig
    """Prompt JSONL (``data.train``); ``batch_size`` prompts are sampled at a time."""
    tokenizer: str | None = None
    """Tokenizer directory (default: the policy checkpoint's own)."""
    policy: ModelSpec
    """The model that samples."""
    rewards: RewardConfig
    """The selector: ``rewards.model`` (required) scores every sample."""
    output_dir: str = "runs/best_of_n"
    """Where ``best_of_n.jsonl`` and ``result.json`` go."""
    group_size: int = 8
    """N: samples per prompt, the best of which is kept."""
    sampling: GenerationConfig = GenerationConfig()
    """How the N samples are drawn."""
    progress: bool = True
    """Show a progress bar (stderr)."""
    seed: int = 0
    """Seed of every sample."""

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.rewards.model is None:
            raise ValueError("best-of-N needs rewards.model (the reward model that selects)")
        if self.group_size > 1 and self.sampling.temperature == 0:
            raise ValueError(f"sampling.temperature=0 draws the same completion {self.group_size}"
                             f" times (greedy): best-of-{self.group_size} would select among "
                             f"copies; use a temperature > 0")
        if self.data.on_overflow == "truncate":
            raise ValueError("data.on_overflow='truncate' would cut prompts; use 'error' or "
                             "'skip' for prompt data")


def select_best(scores: np.ndarray, n: int) -> np.ndarray:
    """Index (into the flat ``[P * n]`` array) of each prompt's highest score; ties go to the
    first sample."""
    groups = np.asarray(scores).reshape(-1, n)
    return np.arange(groups.shape[0]) * n + np.argmax(groups, axis=1)


class _Tally:
    """Selected rows and the reward means of the selected and of all samples."""

    def __init__(self, names):
        self.rows, self.best, self.mean = [], [], []
        self.extra_best = {k: [] for k in names}
        self.extra_all = {k: [] for k in names}

    def add(self, prompt_rows, texts, scores: np.ndarray, n: int, extra: dict) -> None:
        best = select_best(scores, n)[:len(prompt_rows)]
        groups = scores.reshape(-1, n)[:len(prompt_rows)]
        for row, flat, group in zip(prompt_rows, best, groups):
            text = texts[flat]  # a conversational prompt gets an assistant-turn completion
            completion = ([{"role": "assistant", "content": text}]
                          if isinstance(row["prompt"], list) else text)
            self.rows.append({"prompt": row["prompt"], "completion": completion,
                              "score": float(scores[flat]),
                              "group_mean_score": float(group.mean())})
        self.best += [float(scores[f]) for f in best]
        self.mean += [float(g.mean()) for g in groups]
        for name, vals in extra.items():
            self.extra_all[name] += list(vals)
            self.extra_best[name] += [float(vals[f]) for f in best]

    def summary(self) -> dict:
        out = {"reward_model/best_mean": float(np.mean(self.best)),
               "reward_model/sample_mean": float(np.mean(self.mean))}
        for name in self.extra_best:
            # a scorer's None (does not apply) is NaN here and left out of the means
            out[f"{name}/best_mean"] = float(np.nanmean(self.extra_best[name]))
            out[f"{name}/sample_mean"] = float(np.nanmean(self.extra_all[name]))
        return out


def run(cfg: BestOfNConfig, *, eval_rewards: Mapping[str, RewardFn] | None = None) -> dict:
    """Sample, score, select and write; returns the summary (also in ``result.json``).
    ``eval_rewards`` (e.g. a task's gold scorer) are reported on the selected and on all
    samples, so the gain can be checked against a reward the selector never saw."""
    tokenizer = load_tokenizer(cfg.tokenizer, "policy", cfg.policy,
                               others={"rewards.model": cfg.rewards.model},
                               chat_template=cfg.data.chat_template)
    report: dict = {}
    prompts, rows = load_prompts(cfg.data.train, cfg.data, tokenizer, report=report)
    v, n, s = tokenizer.vocab_size, cfg.group_size, cfg.sampling
    policy, params = load_model(cfg.policy, heads=("lm",), vocab_size=v, seed=cfg.seed)
    if cfg.policy.lora is not None and cfg.policy.adapter is None:
        raise ValueError("policy.lora without policy.adapter would sample the base model (a "
                         "fresh adapter changes nothing); give policy.adapter, a trained "
                         "adapter directory such as a LoRA run's adapter/")
    policy, params, adapted = with_adapter(cfg.policy, policy, params, seed=cfg.seed)
    if adapted is not None:  # sampled merge-free: the adapter runs inside the compiled program
        params = adapted.join(params)
    rm, rm_params = load_model(cfg.rewards.model, heads=("reward",), vocab_size=v,
                               seed=cfg.seed, require=("reward",), frozen="rewards.model")
    check_sequence_fits({"policy": policy.config, "reward": rm.config},
                        prompt_width=prompts.tokens.shape[1],
                        max_new_tokens=s.max_new_tokens)
    # after every check; nothing to checkpoint
    run_dir = prepare_run_dir(cfg, cfg.output_dir, ignore=(), checkpoints=False)
    sample = make_sampler(policy, SamplingConfig(
        max_new_tokens=s.max_new_tokens, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, n=n))
    score = jax.jit(lambda p, *a: sequence_rewards(rm, p, *a))
    key, b, tally = jax.random.PRNGKey(cfg.seed), cfg.data.batch_size, _Tally(eval_rewards or {})
    bar = None
    if cfg.progress and parallel.is_main_process():
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="best-of-n", dynamic_ncols=True)
    for i, start in enumerate(range(0, len(rows), b)):
        idx = np.arange(start, start + b) % len(rows)  # last batch padded by wrapping
        real = idx[:min(b, len(rows) - start)]
        out = sample(params, prompts.tokens[idx], prompts.mask[idx], jax.random.fold_in(key, i))
        scores = np.asarray(score(rm_params, out.prompt_tokens, out.prompt_mask, out.tokens,
                                  out.mask))
        texts = decode_completions(tokenizer, out.tokens, out.mask)
        extra = {}
        if eval_rewards:
            rep = np.repeat(real, n)
            cols = {c: [rows[k].get(c) for k in rep] for c in rows[0] if c != "prompt"}
            extra = call_reward_fns(eval_rewards, [rows[k]["prompt"] for k in rep],
                                    texts[:len(real) * n], cols,
                                    time_limit=cfg.rewards.time_limit).values
        tally.add([rows[k] for k in real], texts, scores, n, extra)
        if bar is not None:
            bar.update(len(real))
    if bar is not None:
        bar.close()
    path = os.path.join(run_dir, "best_of_n.jsonl")
    if parallel.is_main_process():  # every process computed the same rows; one writes
        write_jsonl(path, tally.rows)
    result = ({"output": path, "prompts": len(rows), "group_size": n, "data": report}
              | tally.summary())
    write_json(os.path.join(run_dir, "result.json"), result)
    parallel.barrier(f"best_of_n {run_dir}")  # the next stage reads the file
    return result


if __name__ == "__main__":  # python -m rlhf_jax.pipelines.best_of_n is `rlhf-jax best-of-n`
    import sys

    from rlhf_jax.cli import main

    sys.exit(main(["best-of-n", *sys.argv[1:]]))
