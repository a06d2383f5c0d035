"""The reward-KL frontier of PPO and DPO (Rafailov et al. 2023, Fig. 2): for several KL
strengths, train each method from the same SFT model and plot gold reward against the measured
KL(policy || SFT) on held-out prompts.

    python -m experiments.kl_frontier
    python -m experiments.kl_frontier --ppo-kl-coefs 0.3,0.1,0.03 --dpo-betas 1.0,0.3,0.1

Writes ``plots/kl_frontier.png`` and ``summary.md`` (one row per run: method, strength, KL,
gold reward, win rate over SFT).
"""

from __future__ import annotations

import dataclasses
import os

from experiments import _common as common
from experiments._cli import main
from experiments._world import PPOWorldConfig, policy_report, prepare, train_ppo, train_rm, \
    train_sft
from experiments.dpo_preference import train_dpo
from experiments.tasks import preference_world as world
from rlhf_jax.train import plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(PPOWorldConfig):
    name: str = "kl_frontier"
    ppo_kl_coefs: str = "0.3,0.1,0.03"
    dpo_betas: str = "1.0,0.3,0.1"
    ppo_steps: int = 50
    loss: str = "sigmoid"
    beta: float = 0.3
    dpo_steps: int = 150
    dpo_batch_size: int = 32
    dpo_lr: float = 5e-5
    report_samples: int = 2


def get_config() -> Config:
    return Config()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir, paths, stats, tok = prepare(cfg)
    sft_dir = timer("sft", train_sft, cfg, run_dir, paths, tok)["model_dir"]
    rm_dir = timer("reward_model", train_rm, cfg, run_dir, paths, tok, sft_dir)["model_dir"]
    kw = dict(n=cfg.report_samples, max_new_tokens=cfg.max_new_tokens,
              temperature=cfg.temperature, seed=cfg.seed + 1)
    base = policy_report(sft_dir, sft_dir, tok, paths["eval_prompts"], **kw)
    points = []
    for coef in _floats(cfg.ppo_kl_coefs):
        d = timer(f"ppo {coef}", train_ppo, cfg, run_dir, paths, tok, sft_dir, rm_dir,
                  kl_coef=coef, stage=f"ppo_kl{coef}")["model_dir"]
        points.append(("PPO", coef, policy_report(d, sft_dir, tok, paths["eval_prompts"], **kw)))
    for beta in _floats(cfg.dpo_betas):
        d = timer(f"dpo {beta}", train_dpo, cfg, run_dir, paths, tok, sft_dir, beta=beta,
                  stage=f"dpo_beta{beta}")["model_dir"]
        points.append(("DPO", beta, policy_report(d, sft_dir, tok, paths["eval_prompts"], **kw)))
    series = {}
    for method in ("PPO", "DPO"):
        pts = sorted((p["kl"], p["gold"]) for m, _, p in points if m == method)
        series[method] = ([x for x, _ in pts], [y for _, y in pts])
    series["SFT"] = ([base["kl"]], [base["gold"]])
    plots.plot_xy(series, os.path.join(run_dir, "plots", "kl_frontier.png"),
                  xlabel="KL(policy || SFT) per sequence", ylabel="gold reward",
                  title="Reward-KL frontier")
    table = {"SFT": f"KL {base['kl']:.2f}, gold {base['gold']:.3f}"}
    for method, strength, p in points:
        win = common.win_rate(world.gold_score, base["rows"], p["texts"], base["texts"])
        name = "kl_coef" if method == "PPO" else "beta"
        table[f"{method} {name}={strength}"] = (f"KL {p['kl']:.2f}, gold {p['gold']:.3f}, "
                                                f"win rate vs SFT {win:.2f}")
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    common.write_summary(os.path.join(run_dir, "summary.md"), f"kl_frontier: {cfg.name}",
                         {"Frontier": table, "Wall time": times})
    return {"run_dir": run_dir, "points": [(m, s, p["kl"], p["gold"]) for m, s, p in points]}


if __name__ == "__main__":
    main(get_config, run)
