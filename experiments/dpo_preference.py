"""DPO (or any loss of ``pipelines.dpo.LOSSES``) on the preference world: SFT, then preference
fine-tuning on the annotators' pairs, then the gold win rate of the DPO policy over SFT.

    python -m experiments.dpo_preference
    python -m experiments.dpo_preference --loss ipo --beta 0.5 --name ipo

Writes ``runs/<name>/`` (data, tokenizer, ``sft/``, ``dpo/``, ``plots/``, ``summary.md``).
"""

from __future__ import annotations

import dataclasses
import os

from experiments import _common as common
from experiments._cli import main
from experiments._world import MAX_PROMPT, WorldConfig, policy_report, prepare, train_sft
from experiments.tasks import preference_world as world
from rlhf_jax.parallel import parse_mesh
from rlhf_jax.pipelines import DataConfig, ModelSpec, dpo
from rlhf_jax.train import LoopConfig, OptimizerConfig, plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(WorldConfig):
    name: str = "dpo_preference"
    loss: str = "sigmoid"
    beta: float = 0.3
    dpo_steps: int = 150
    dpo_batch_size: int = 32
    dpo_lr: float = 5e-5
    win_rate_samples: int = 4

    def __post_init__(self):
        # the DPO stage's options are checked here, not after the SFT stage has trained
        dpo.DPOAlgorithmConfig(loss=self.loss, beta=self.beta)
        OptimizerConfig(learning_rate=self.dpo_lr)


def get_config() -> Config:
    return Config()


def train_dpo(cfg: Config, run_dir: str, paths: dict, tok: str, sft_dir: str, *,
              beta: float | None = None, stage: str = "dpo") -> dict:
    return common.completed(dpo.run(dpo.DPOConfig(
        data=DataConfig(train=paths["preference"], eval=paths["preference_eval"],
                        max_prompt_length=MAX_PROMPT, max_length=56,
                        batch_size=cfg.dpo_batch_size, on_overflow="truncate"),
        tokenizer=tok, policy=ModelSpec(path=sft_dir), output_dir=os.path.join(run_dir, stage),
        algorithm=dpo.DPOAlgorithmConfig(loss=cfg.loss,
                                         beta=cfg.beta if beta is None else beta),
        seed=cfg.seed, mesh=parse_mesh(cfg.mesh),
        optimizer=OptimizerConfig(
            learning_rate=cfg.dpo_lr, warmup_steps=min(10, cfg.dpo_steps // 10)),
        loop=LoopConfig(total_steps=cfg.dpo_steps, log_every=10,
                        eval_every=max(cfg.dpo_steps // 4, 1), save_every=cfg.dpo_steps))))


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir, paths, stats, tok = prepare(cfg)
    sft_res = timer("sft", train_sft, cfg, run_dir, paths, tok)
    dpo_res = timer("dpo", train_dpo, cfg, run_dir, paths, tok, sft_res["model_dir"])
    kw = dict(n=cfg.win_rate_samples, max_new_tokens=cfg.max_new_tokens,
              temperature=cfg.temperature, seed=cfg.seed + 1)
    before = policy_report(sft_res["model_dir"], sft_res["model_dir"], tok,
                           paths["eval_prompts"], **kw)
    after = policy_report(dpo_res["model_dir"], sft_res["model_dir"], tok,
                          paths["eval_prompts"], **kw)
    win = common.win_rate(world.gold_score, before["rows"], after["texts"], before["texts"])
    scorers = {"gold": world.gold_score}
    common.write_samples(os.path.join(run_dir, "samples_before.jsonl"), before["rows"],
                         before["texts"], scorers)
    common.write_samples(os.path.join(run_dir, "samples_after.jsonl"), after["rows"],
                         after["texts"], scorers)
    rows = common.combine_metrics(run_dir, ("sft", "dpo"))
    plots.plot_curves([r for r in rows if r["stage"] == "dpo"],
                      ["loss", "rewards/accuracy", "rewards/margin"],
                      os.path.join(run_dir, "plots", "dpo.png"), title=f"DPO ({cfg.loss})")
    outcome = {"loss": cfg.loss, "beta": cfg.beta,
               "DPO held-out preference accuracy": dpo_res["eval"]["rewards/accuracy"],
               "gold reward, SFT": before["gold"], "gold reward, DPO": after["gold"],
               "DPO win rate vs SFT on gold": win, "KL(DPO || SFT) per sequence": after["kl"],
               "response length SFT / DPO": f"{before['length']:.2f} / {after['length']:.2f}"}
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    common.write_summary(os.path.join(run_dir, "summary.md"), f"dpo_preference: {cfg.name}",
                         {"Outcome": outcome, "Wall time": times})
    return {"run_dir": run_dir, "outcome": outcome}


if __name__ == "__main__":
    main(get_config, run)
