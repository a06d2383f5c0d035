"""RL with verifiable rewards: SFT on noisy arithmetic (30% of the answers are wrong), then a
GRPO-family variant rewarded by an exact-match verifier; exact match before and after, greedy and
sampled, on held-out problems and on training prompts.

    python -m experiments.grpo_arithmetic
    python -m experiments.grpo_arithmetic --variant grpo --name grpo
    python -m experiments.grpo_arithmetic --variant dapo --grpo-steps 150

Variants: see ``rlhf_jax.pipelines.grpo.VARIANTS``. Writes ``runs/<name>/`` with the data,
tokenizer, ``sft/`` and ``grpo/`` stages, ``plots/grpo.png`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from experiments import _common as common
from experiments._cli import main
from experiments.tasks import arithmetic
from rlhf_jax.fileio import atomic_write
from rlhf_jax.parallel import is_main_process, parse_mesh
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, ModelSpec, grpo,
                                sft)
from rlhf_jax.rewards import exact_match, exact_match_reward
from rlhf_jax.train import LoopConfig, OptimizerConfig, plots

MAX_PROMPT = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "grpo_arithmetic"
    runs_root: str = "runs"
    seed: int = 0
    max_operand: int = 9
    n_sft: int = 3000
    n_train: int = 2000
    n_eval: int = 50
    wrong_fraction: float = 0.3
    vocab_size: int = 384
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    sft_steps: int = 400
    sft_lr: float = 2e-3
    variant: str = "dr_grpo"
    grpo_steps: int = 400
    prompts_per_step: int = 16
    group_size: int = 8
    grpo_lr: float = 2e-4
    kl_coef: float = 0.0
    max_new_tokens: int = 6
    temperature: float = 1.0
    eval_every: int = 50
    mesh: str = "auto"
    """Device mesh: "auto" (data parallel over all devices), "none" (one device) or
    DATAxFSDPxTENSOR such as "2x4x1"."""

    def __post_init__(self):
        # the GRPO stage's options are checked here, not after the SFT stage has trained
        grpo.GRPOAlgorithmConfig(variant=self.variant, group_size=self.group_size)
        GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)
        OptimizerConfig(learning_rate=self.grpo_lr)
        parse_mesh(self.mesh)


def get_config() -> Config:
    return Config()


def exact_match_rate(model_dir: str, tok: str, path: str, cfg: Config, *, temperature: float,
                     n: int = 1) -> tuple[float, list]:
    """Mean exact match over ``n`` samples per eval prompt (temperature 0: greedy)."""
    rows, texts = common.sample_texts(model_dir, tok, path, n=n, max_prompt_length=MAX_PROMPT,
                                      max_new_tokens=cfg.max_new_tokens, temperature=temperature,
                                      seed=cfg.seed)
    hits = [exact_match(t, r["answer"]) for r, ts in zip(rows, texts) for t in ts]
    return float(np.mean(hits)), list(zip(rows, texts))


def sft_config(cfg: Config, paths: dict, tok: str, run_dir: str) -> sft.SFTConfig:
    """The noisy-answer SFT stage."""
    return sft.SFTConfig(
        data=DataConfig(train=paths["sft"], max_length=32, packing=True, batch_size=32),
        tokenizer=tok, output_dir=os.path.join(run_dir, "sft"),
        model=ModelSpec(preset="toy-1m", overrides=common.model_overrides(cfg)), seed=cfg.seed,
        mesh=parse_mesh(cfg.mesh),
        optimizer=OptimizerConfig(
            learning_rate=cfg.sft_lr, warmup_steps=min(20, cfg.sft_steps // 10),
            weight_decay=0.01),
        loop=LoopConfig(total_steps=cfg.sft_steps, log_every=20, save_every=cfg.sft_steps))


def grpo_config(cfg: Config, paths: dict, tok: str, run_dir: str,
                sft_dir: str) -> grpo.GRPOConfig:
    """The GRPO-family stage from the SFT model, rewarded by exact match."""
    return grpo.GRPOConfig(
        data=DataConfig(train=paths["train_prompts"], eval=paths["eval_prompts"],
                        max_prompt_length=MAX_PROMPT, batch_size=cfg.prompts_per_step),
        tokenizer=tok, policy=ModelSpec(path=sft_dir),
        algorithm=grpo.GRPOAlgorithmConfig(variant=cfg.variant, group_size=cfg.group_size),
        output_dir=os.path.join(run_dir, "grpo"),
        sampling=GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature),
        kl=KLConfig(coef=cfg.kl_coef), seed=cfg.seed, mesh=parse_mesh(cfg.mesh),
        optimizer=OptimizerConfig(learning_rate=cfg.grpo_lr, schedule="constant"),
        loop=LoopConfig(total_steps=cfg.grpo_steps, log_every=5, eval_every=cfg.eval_every,
                        save_every=cfg.grpo_steps))


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir = os.path.join(cfg.runs_root, cfg.name)
    common.save_config(run_dir, cfg)

    def write() -> tuple[dict, str]:  # process 0 writes, every process reads
        data = arithmetic.write_datasets(os.path.join(run_dir, "data"), seed=cfg.seed,
                                         n_sft=cfg.n_sft, n_train=cfg.n_train,
                                         n_eval=cfg.n_eval, wrong_fraction=cfg.wrong_fraction,
                                         max_operand=cfg.max_operand)
        seen = os.path.join(run_dir, "data", "train_prompts_subset.jsonl")
        with open(data["paths"]["train_prompts"], encoding="utf-8") as src:
            atomic_write(seen, "".join(src.readlines()[:cfg.n_eval]))
        corpus = arithmetic.corpus(cfg.seed, max_operand=cfg.max_operand)
        return data, common.tokenizer_for(run_dir, corpus, vocab_size=cfg.vocab_size)

    data, tok = common.main_first(write)
    paths = data["paths"]
    sft_res = timer("sft", sft.run, sft_config(cfg, paths, tok, run_dir))
    seen = os.path.join(run_dir, "data", "train_prompts_subset.jsonl")

    def rates(model_dir):
        """Greedy and sampled exact match, on held-out problems and on training prompts."""
        out = {}
        for split, path in (("held-out", paths["eval_prompts"]), ("train prompts", seen)):
            out[f"greedy, {split}"] = exact_match_rate(model_dir, tok, path, cfg,
                                                       temperature=0.0)[0]
            out[f"sampled T={cfg.temperature}, {split}"] = exact_match_rate(
                model_dir, tok, path, cfg, temperature=cfg.temperature, n=4)[0]
        return out

    before = rates(sft_res["model_dir"])
    grpo_res = timer("grpo", grpo.run, grpo_config(cfg, paths, tok, run_dir,
                                                   sft_res["model_dir"]),
                     reward_fns={"exact_match": exact_match_reward})
    after = rates(grpo_res["model_dir"])
    _, samples = exact_match_rate(grpo_res["model_dir"], tok, paths["eval_prompts"], cfg,
                                  temperature=0.0)
    rows = common.combine_metrics(run_dir, ("sft", "grpo"))
    g = [r for r in rows if r["stage"] == "grpo"]
    plots.plot_curves(g, ["rewards/exact_match", "response_length", "kept_frac"],
                      os.path.join(run_dir, "plots", "grpo_train.png"), split="train",
                      title=f"{cfg.variant}: training rollouts")
    plots.plot_curves(g, ["rewards/exact_match"], os.path.join(run_dir, "plots", "grpo_eval.png"),
                      split="eval", title=f"{cfg.variant}: greedy exact match (eval)")
    if is_main_process():
        atomic_write(os.path.join(run_dir, "samples_after.jsonl"), "".join(
            json.dumps({"prompt": r["prompt"], "completion": t[0], "answer": r["answer"]}) + "\n"
            for r, t in samples[:32]))
    outcome = {"variant": cfg.variant,
               "SFT data wrong-answer fraction": cfg.wrong_fraction}
    for k in before:
        outcome[f"exact match ({k}): SFT -> RL"] = f"{before[k]:.3f} -> {after[k]:.3f}"
        outcome[f"gain in points ({k})"] = round(100 * (after[k] - before[k]), 1)
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    common.write_summary(os.path.join(run_dir, "summary.md"), f"grpo_arithmetic: {cfg.name}",
                         {"Outcome": outcome, "Wall time": times})
    return {"run_dir": run_dir, "outcome": outcome, "before": before, "after": after}


if __name__ == "__main__":
    main(get_config, run)
