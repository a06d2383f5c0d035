"""Reward over-optimisation (Gao et al. 2022): gold reward against KL as a policy is pushed
against a learned proxy reward, for best-of-N sampling and for PPO with a weak KL penalty.

    python -m experiments.overoptimization
    python -m experiments.overoptimization --ppo-steps 200 --kl-coef 0.0

The preference world's gold scorer punishes repetition and over-long answers, which its
preference data almost never shows; the proxy reward model learns "more on-topic words is
better" and the optimised policy eventually exploits it (see the trap in
``experiments.tasks.preference_world``). Expected shape: the proxy keeps rising with KL while
gold rises, peaks and falls. Writes ``plots/overoptimization.png`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import os

from experiments import _common as common
from experiments._cli import main
from experiments._world import PPOWorldConfig, prepare, train_ppo, train_rm, train_sft
from experiments.best_of_n import sweep
from rlhf_jax.train import plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(PPOWorldConfig):
    name: str = "overoptimization"
    ppo_steps: int = 120
    kl_coef: float = 0.002
    ppo_lr: float = 2e-4
    eval_every: int = 6
    bon_max_n: int = 64


def get_config() -> Config:
    return Config()


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir, paths, stats, tok = prepare(cfg)
    sft_res = timer("sft", train_sft, cfg, run_dir, paths, tok)
    rm_res = timer("reward_model", train_rm, cfg, run_dir, paths, tok, sft_res["model_dir"])
    ns, n = [], 1
    while n <= cfg.bon_max_n:
        ns.append(n)
        n *= 4
    bon = timer("best_of_n", sweep, cfg, run_dir, paths, tok, sft_res["model_dir"],
                rm_res["model_dir"], ns)
    timer("ppo", train_ppo, cfg, run_dir, paths, tok, sft_res["model_dir"],
          rm_res["model_dir"])
    rows = common.combine_metrics(run_dir, ("sft", "reward_model", "ppo"))
    ev = [r for r in rows if r["stage"] == "ppo" and r["split"] == "eval"]
    kl = [r["kl"] for r in ev]
    plots.plot_xy({"PPO gold": (kl, [r["rewards/gold"] for r in ev]),
                   "PPO proxy": (kl, [r["rewards/reward_model"] for r in ev]),
                   "best-of-N gold": ([p["kl_bound"] for p in bon], [p["gold"] for p in bon]),
                   "best-of-N proxy": ([p["kl_bound"] for p in bon], [p["proxy"] for p in bon])},
                  os.path.join(run_dir, "plots", "overoptimization.png"),
                  xlabel="KL(policy || SFT) per sequence", ylabel="reward",
                  title="Gold vs proxy reward as KL grows")
    peak = max(ev, key=lambda r: r["rewards/gold"])
    table = {"PPO eval points": len(ev),
             "PPO gold at start / peak / end": f"{ev[0]['rewards/gold']:.3f} / "
             f"{peak['rewards/gold']:.3f} / {ev[-1]['rewards/gold']:.3f}",
             "PPO KL at gold peak / end": f"{peak['kl']:.2f} / {ev[-1]['kl']:.2f}",
             "PPO proxy at start / peak-gold / end": f"{ev[0]['rewards/reward_model']:.3f} / "
             f"{peak['rewards/reward_model']:.3f} / {ev[-1]['rewards/reward_model']:.3f}",
             "PPO response length at end": ev[-1]["response_length"]}
    table |= {f"best-of-{p['n']} (KL<={p['kl_bound']:.2f})": f"gold {p['gold']:.3f}, proxy "
              f"{p['proxy']:.3f}" for p in bon}
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    common.write_summary(os.path.join(run_dir, "summary.md"), f"overoptimization: {cfg.name}",
                         {"Gold vs proxy": table, "Wall time": times})
    return {"run_dir": run_dir, "ppo_eval": ev, "best_of_n": bon}


if __name__ == "__main__":
    main(get_config, run)
