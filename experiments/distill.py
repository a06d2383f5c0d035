"""Knowledge distillation on the preference world: a small student learns from the SFT model
(the teacher) either by matching the teacher's token distributions (``pipelines.distill``) or
by plain SFT on the teacher's samples; both are scored by their token-level KL to the teacher
on held-out teacher samples.

    python -m experiments.distill
    python -m experiments.distill --loss reverse_kl --student-hidden-size 48

Writes ``runs/<name>/`` with the teacher (``sft/``), ``teacher_samples*.jsonl``,
``distill/`` and ``student_sft/`` stages, ``plots/distill.png`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from experiments import _common as common
from experiments._cli import main
from experiments._world import MAX_PROMPT, WorldConfig, prepare, train_sft
from rlhf_jax.data import Tokenizer
from rlhf_jax.fileio import atomic_write
from rlhf_jax.parallel import parse_mesh
from rlhf_jax.pipelines import DataConfig, ModelSpec, distill
from rlhf_jax.pipelines.datasets import fixed_batches, load_sft_batch
from rlhf_jax.pipelines.setup import load_model
from rlhf_jax.train import LoopConfig, OptimizerConfig, evaluate, plots


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(WorldConfig):
    name: str = "distill"
    loss: str = "forward_kl"
    student_hidden_size: int = 64
    student_layers: int = 2
    samples_per_prompt: int = 4
    student_steps: int = 300
    student_lr: float = 2e-3
    student_batch_size: int = 32


def get_config() -> Config:
    return Config()


def _student(cfg: Config) -> ModelSpec:
    return ModelSpec(preset="toy-1m", overrides={
        "hidden_size": cfg.student_hidden_size,
        "intermediate_size": cfg.student_hidden_size * 8 // 3,
        "num_layers": cfg.student_layers, "num_heads": 2, "num_kv_heads": 1})


def write_teacher_samples(teacher_dir: str, tok: str, prompts: str, out: str, cfg: Config,
                          seed: int) -> str:
    """Sample the teacher into an SFT JSONL file (process 0 writes; the others wait)."""
    return common.main_first(lambda: _write_teacher_samples(teacher_dir, tok, prompts, out, cfg,
                                                            seed))


def _write_teacher_samples(teacher_dir: str, tok: str, prompts: str, out: str, cfg: Config,
                           seed: int) -> str:
    rows, texts = common.sample_texts(teacher_dir, tok, prompts, n=cfg.samples_per_prompt,
                                      max_prompt_length=MAX_PROMPT,
                                      max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, seed=seed)
    atomic_write(out, "".join(json.dumps({"prompt": row["prompt"], "completion": t}) + "\n"
                              for row, ts in zip(rows, texts) for t in ts if t.strip()))
    return out


def teacher_kl(student_dir: str, teacher_dir: str, tok_dir: str, data: str, cfg: Config) -> dict:
    """Token-mean forward KL(teacher || student) and reverse KL on ``data`` (exact means)."""
    tok = Tokenizer.load(tok_dir)
    batch = load_sft_batch(data, DataConfig(train=data, max_length=48), tok)
    v = tok.vocab_size
    student, sp = load_model(ModelSpec(path=student_dir), heads=("lm",), vocab_size=v, seed=0)
    teacher, tp = load_model(ModelSpec(path=teacher_dir), heads=("lm",), vocab_size=v, seed=0)
    out = {}
    for loss in ("forward_kl", "reverse_kl"):
        fn = distill.make_distill_loss(student, teacher,
                                       distill.DistillAlgorithmConfig(loss=loss))
        step = jax.jit(lambda p, b, k, fn=fn: fn(p, b, k, tp))
        out[loss] = evaluate(step, sp, fixed_batches(batch, 32), jax.random.PRNGKey(0))["loss"]
    return out


def run(cfg: Config) -> dict:
    timer = common.Timer()
    run_dir, paths, stats, tok = prepare(cfg)
    teacher = timer("teacher (sft)", train_sft, cfg, run_dir, paths, tok)["model_dir"]
    train = write_teacher_samples(teacher, tok, paths["prompts"],
                                  os.path.join(run_dir, "teacher_samples.jsonl"), cfg, cfg.seed)
    held = write_teacher_samples(teacher, tok, paths["eval_prompts"],
                                 os.path.join(run_dir, "teacher_samples_eval.jsonl"), cfg,
                                 cfg.seed + 1)
    opt = OptimizerConfig(learning_rate=cfg.student_lr,
                          warmup_steps=min(20, cfg.student_steps // 10))
    loop = LoopConfig(total_steps=cfg.student_steps, log_every=10,
                      eval_every=max(cfg.student_steps // 5, 1), save_every=cfg.student_steps)
    dist = timer("distill", distill.run, distill.DistillConfig(
        data=DataConfig(train=train, eval=held, max_length=48,
                        batch_size=cfg.student_batch_size),
        tokenizer=tok, teacher=ModelSpec(path=teacher), student=_student(cfg),
        output_dir=os.path.join(run_dir, "distill"),
        algorithm=distill.DistillAlgorithmConfig(loss=cfg.loss), optimizer=opt, loop=loop,
        seed=cfg.seed, mesh=parse_mesh(cfg.mesh)))
    small = dataclasses.replace(cfg, sft_steps=cfg.student_steps, sft_lr=cfg.student_lr,
                                sft_batch_size=cfg.student_batch_size)
    sft_student = timer("student sft", train_sft, small, run_dir, paths, tok, train_data=train,
                        stage="student_sft", model=_student(cfg))
    kl_d = teacher_kl(dist["model_dir"], teacher, tok, held, cfg)
    kl_s = teacher_kl(sft_student["model_dir"], teacher, tok, held, cfg)
    rows = common.combine_metrics(run_dir, ("distill",))
    plots.plot_curves(rows, ["loss"], os.path.join(run_dir, "plots", "distill.png"),
                      split="eval", title=f"held-out {cfg.loss} to the teacher")
    table = {"loss": cfg.loss,
             "KL(teacher || student), distilled": kl_d["forward_kl"],
             "KL(teacher || student), SFT on teacher samples": kl_s["forward_kl"],
             "KL(student || teacher), distilled": kl_d["reverse_kl"],
             "KL(student || teacher), SFT on teacher samples": kl_s["reverse_kl"]}
    times = {f"{k} (s)": round(v, 1) for k, v in timer.times.items()}
    common.write_summary(os.path.join(run_dir, "summary.md"), f"distill: {cfg.name}",
                         {"Student vs teacher (token-mean KL on held-out teacher samples)": table,
                          "Wall time": times})
    return {"run_dir": run_dir, "distilled": kl_d, "sft": kl_s}


if __name__ == "__main__":
    main(get_config, run)
