"""The main job: SFT -> reward model -> PPO on the synthetic preference world, end to end.

    python -m experiments.rlhf_pipeline                 # defaults: a few minutes on 2 CPU cores
    python -m experiments.rlhf_pipeline --name long --ppo-steps 300 --kl-coef 0.02
    python -m experiments.rlhf_pipeline --help          # every option

Writes ``runs/<name>/``: ``experiment_config.json``; ``data/`` (the task's JSONL files) and
``tokenizer/``; one directory per stage (``sft/``, ``reward_model/``, ``ppo/``) with its
``config.json``, ``metrics.jsonl``, TensorBoard events, Orbax checkpoints and the exported
model; the combined ``metrics.jsonl``; ``plots/*.png``; ``samples_before.jsonl`` and
``samples_after.jsonl``; ``summary.md``. Re-running with the same name resumes each stage
from its last checkpoint (a finished stage is not retrained).
"""

from __future__ import annotations

import dataclasses
import os

from experiments import _common as common
from experiments._cli import main
from experiments._world import (MAX_PROMPT, PPOWorldConfig, prepare, train_ppo, train_rm,
                                train_sft)
from experiments.tasks import preference_world as world
from rlhf_jax.train import plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(PPOWorldConfig):
    win_rate_samples: int = 4


def get_config() -> Config:
    return Config()


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir, paths, stats, tok = prepare(cfg)
    max_prompt = MAX_PROMPT
    sft_res = timer("sft", train_sft, cfg, run_dir, paths, tok)
    rm_res = timer("reward_model", train_rm, cfg, run_dir, paths, tok, sft_res["model_dir"])
    ppo_res = timer("ppo", train_ppo, cfg, run_dir, paths, tok, sft_res["model_dir"],
                    rm_res["model_dir"])

    # before / after on held-out prompts, several samples each
    kw = dict(n=cfg.win_rate_samples, max_prompt_length=max_prompt,
              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + 1)
    rows, before = common.sample_texts(sft_res["model_dir"], tok, paths["eval_prompts"], **kw)
    _, after = common.sample_texts(ppo_res["model_dir"], tok, paths["eval_prompts"], **kw)
    scorers = {"gold": world.gold_score}
    common.write_samples(os.path.join(run_dir, "samples_before.jsonl"), rows, before, scorers)
    common.write_samples(os.path.join(run_dir, "samples_after.jsonl"), rows, after, scorers)
    win = common.win_rate(world.gold_score, rows, after, before)

    metrics = common.combine_metrics(run_dir, ("sft", "reward_model", "ppo"))
    ppo_rows = [r for r in metrics if r["stage"] == "ppo"]
    evals = [r for r in ppo_rows if r["split"] == "eval"]
    pdir = os.path.join(run_dir, "plots")
    plots.plot_curves(ppo_rows, ["rewards/reward_model", "rewards/gold", "kl"],
                      os.path.join(pdir, "ppo_rewards_kl.png"), split="eval",
                      title="PPO on held-out prompts")
    plots.plot_curves(ppo_rows, ["reward", "kl", "entropy", "policy/clip_frac",
                                 "value/explained_variance"],
                      os.path.join(pdir, "ppo_train.png"), split="train", title="PPO training")
    plots.plot_xy({"PPO": ([r["kl"] for r in evals], [r["rewards/gold"] for r in evals])},
                  os.path.join(pdir, "gold_vs_kl.png"), xlabel="KL(policy || SFT) per sequence",
                  ylabel="gold reward", title="Gold reward against KL")
    plots.plot_curves([r for r in metrics if r["stage"] == "sft"], ["loss"],
                      os.path.join(pdir, "sft_loss.png"), split="train", title="SFT")
    plots.plot_curves([r for r in metrics if r["stage"] == "reward_model"],
                      ["loss", "rewards/accuracy"], os.path.join(pdir, "reward_model.png"),
                      title="Reward model (train and eval)")

    first, last = evals[0], evals[-1]
    outcome = {
        "SFT final train loss": sft_res["train"]["loss"],
        "RM held-out accuracy": rm_res["eval"]["rewards/accuracy"],
        "annotator agreement ceiling": stats["agreement_ceiling"],
        "gold reward, SFT policy (eval prompts)": common.mean_score(world.gold_score, rows,
                                                                    before),
        "gold reward, PPO policy (eval prompts)": common.mean_score(world.gold_score, rows,
                                                                    after),
        "PPO win rate vs SFT on gold": win,
        "KL(PPO || SFT) per sequence": last["kl"],
        "proxy reward at first / last eval": f"{first['rewards/reward_model']:.3f} / "
                                             f"{last['rewards/reward_model']:.3f}",
        "best attainable gold": stats["best_gold"],
    }
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    times["total (s)"] = round(sum(timer.times.values()), 1)
    common.write_summary(os.path.join(run_dir, "summary.md"), f"rlhf_pipeline: {cfg.name}",
                         {"Outcome": outcome, "Wall time": times},
                         ["Plots: `plots/`. Samples: `samples_before.jsonl`, "
                          "`samples_after.jsonl`. Metrics: `metrics.jsonl`, TensorBoard: "
                          f"`tensorboard --logdir {run_dir}`."])
    return {"run_dir": run_dir, "outcome": outcome, "times": timer.times}


if __name__ == "__main__":
    main(get_config, run)
