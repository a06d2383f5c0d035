"""Best-of-N against the learned reward model on the preference world: gold and proxy reward of
the selected sample as N grows, and an SFT dataset of the best samples.

    python -m experiments.best_of_n
    python -m experiments.best_of_n --n 16 --name bon16

Writes ``runs/<name>/`` with the SFT and reward-model stages, ``best_of_n/best_of_n.jsonl``
(prompt/completion rows ready for ``pipelines.sft``), ``plots/best_of_n.png`` and
``summary.md``. The KL of best-of-N to its base policy is ``log N - (N - 1) / N`` at most
(Stiennon et al. 2020), which the summary reports beside each N.
"""

from __future__ import annotations

import dataclasses
import math
import os

from experiments import _common as common
from experiments._cli import main
from experiments._world import MAX_PROMPT, WorldConfig, prepare, train_rm, train_sft
from experiments.tasks import preference_world as world
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, ModelSpec, RewardConfig,
                                best_of_n)
from rlhf_jax.train import plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(WorldConfig):
    name: str = "best_of_n"
    n: int = 16
    """Largest N; the sweep is 1, 2, 4, ... up to n."""


def get_config() -> Config:
    return Config()


def bon_kl(n: int) -> float:
    """Analytic KL(best-of-n || base) bound ``log n - (n - 1) / n``."""
    return math.log(n) - (n - 1) / n


def bon_config(cfg: WorldConfig, tok: str, prompts: str, sft_dir: str, rm_dir: str,
               output_dir: str, *, n: int, batch_size: int, progress: bool = True
               ) -> best_of_n.BestOfNConfig:
    return best_of_n.BestOfNConfig(
        data=DataConfig(train=prompts, max_prompt_length=MAX_PROMPT, batch_size=batch_size),
        tokenizer=tok, policy=ModelSpec(path=sft_dir),
        rewards=RewardConfig(model=ModelSpec(path=rm_dir)), output_dir=output_dir,
        group_size=n, sampling=GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                                                temperature=cfg.temperature),
        seed=cfg.seed, progress=progress)


def sweep(cfg: WorldConfig, run_dir: str, paths: dict, tok: str, sft_dir: str, rm_dir: str,
          ns: list[int]) -> list[dict]:
    out = []
    for n in ns:
        res = best_of_n.run(bon_config(cfg, tok, paths["eval_prompts"], sft_dir, rm_dir,
                                       os.path.join(run_dir, f"bon_{n}"), n=n, batch_size=32,
                                       progress=False),
                            eval_rewards={"gold": world.gold_reward})
        out.append({"n": n, "kl_bound": bon_kl(n), "gold": res["gold/best_mean"],
                    "proxy": res["reward_model/best_mean"], "output": res["output"]})
    return out


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir, paths, stats, tok = prepare(cfg)
    sft_res = timer("sft", train_sft, cfg, run_dir, paths, tok)
    rm_res = timer("reward_model", train_rm, cfg, run_dir, paths, tok, sft_res["model_dir"])
    ns = [2 ** i for i in range(int(math.log2(cfg.n)) + 1)]
    points = timer("best_of_n", sweep, cfg, run_dir, paths, tok, sft_res["model_dir"],
                   rm_res["model_dir"], ns)
    big = timer("dataset", best_of_n.run,
                bon_config(cfg, tok, paths["prompts"], sft_res["model_dir"], rm_res["model_dir"],
                           os.path.join(run_dir, "best_of_n"), n=cfg.n, batch_size=16),
                eval_rewards={"gold": world.gold_reward})
    plots.plot_xy({"gold": ([p["kl_bound"] for p in points], [p["gold"] for p in points]),
                   "proxy (reward model)": ([p["kl_bound"] for p in points],
                                            [p["proxy"] for p in points])},
                  os.path.join(run_dir, "plots", "best_of_n.png"),
                  xlabel="KL bound log N - (N-1)/N", ylabel="reward of the selected sample",
                  title="Best-of-N on held-out prompts")
    table = {f"N={p['n']} (KL<={p['kl_bound']:.2f})": f"gold {p['gold']:.3f}, proxy "
             f"{p['proxy']:.3f}" for p in points}
    table["dataset"] = big["output"]
    table["dataset gold: best / all samples"] = (f"{big['gold/best_mean']:.3f} / "
                                                 f"{big['gold/sample_mean']:.3f}")
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    common.write_summary(os.path.join(run_dir, "summary.md"), f"best_of_n: {cfg.name}",
                         {"Best-of-N sweep": table, "Wall time": times})
    return {"run_dir": run_dir, "points": points, "dataset": big}


if __name__ == "__main__":
    main(get_config, run)
