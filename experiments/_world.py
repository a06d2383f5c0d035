"""The preference-world stages the experiments share: data + tokenizer, SFT, reward model, and
the (gold reward, KL) measurement of any policy checkpoint."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _common as common
from experiments.tasks import preference_world as world
from rlhf_jax.data import Tokenizer
from rlhf_jax.models import score_completions
from rlhf_jax.ops import kl_k1
from rlhf_jax.parallel import parse_mesh
from rlhf_jax.data import decode_completions
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, ModelSpec, RewardConfig,
                                ppo, reward_model, sft)
from rlhf_jax.pipelines.datasets import load_prompts
from rlhf_jax.pipelines.setup import load_model
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import LoopConfig, OptimizerConfig

MAX_PROMPT = 24
"""Prompt bucket (tokens): the world's prompts are at most ~17 tokens with a 512-token BPE."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Fields every preference-world experiment shares (its config subclasses this)."""

    name: str = "default"
    """Run name: everything goes to ``runs_root/name`` (the same name resumes)."""
    runs_root: str = "runs"
    """Directory holding the runs."""
    seed: int = 0
    """Seed of the data, the initialisation and every sample."""
    n_sft: int = 2000
    """SFT demonstrations generated."""
    n_pref: int = 8000
    """Preference pairs generated for the reward model (and DPO)."""
    n_prompts: int = 512
    """Training prompts for the on-policy stages."""
    n_eval_prompts: int = 128
    """Held-out prompts for evaluation."""
    vocab_size: int = 512
    """BPE vocabulary trained on the task's text."""
    hidden_size: int = 128
    """Model width."""
    intermediate_size: int = 344
    """MLP width."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    sft_steps: int = 500
    """SFT optimizer steps."""
    sft_batch_size: int = 32
    """SFT rows per step."""
    sft_lr: float = 2e-3
    """SFT peak learning rate."""
    rm_steps: int = 500
    """Reward-model optimizer steps."""
    rm_batch_size: int = 32
    """Reward-model pairs per step."""
    rm_lr: float = 5e-4
    """Reward-model peak learning rate."""
    max_new_tokens: int = 20
    """Completion length budget when sampling."""
    temperature: float = 1.0
    """Sampling temperature."""
    mesh: str = "auto"
    """Device mesh: "auto" (data parallel over all devices), "none" (one device) or
    DATAxFSDPxTENSOR such as "2x4x1"."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOWorldConfig(WorldConfig):
    """Adds the PPO stage's settings."""

    ppo_steps: int = 80
    """PPO iterations (rollout + updates)."""
    rollout_batch_size: int = 64
    """Prompts sampled per PPO iteration."""
    ppo_epochs: int = 2
    """Passes over each rollout."""
    num_minibatches: int = 2
    """Optimizer updates per pass."""
    ppo_lr: float = 1e-4
    """PPO learning rate (constant)."""
    kl_coef: float = 0.1
    """KL coefficient beta (k1 in the per-token reward)."""
    kl_controller: str = "fixed"
    """``fixed`` or ``adaptive``."""
    value_model: str = "separate"
    """``separate`` critic (from the reward model) or ``shared`` value head."""
    missing_eos_penalty: float = 1.0
    """Score penalty for completions that never emit EOS (keeps PPO from rambling)."""
    eval_every: int = 10
    """Evaluate on held-out prompts every this many PPO iterations."""


def prepare(cfg: WorldConfig) -> tuple[str, dict, dict, str]:
    """``(run_dir, paths, stats, tokenizer_dir)``: the task's JSONL files and tokenizer."""
    run_dir = os.path.join(cfg.runs_root, cfg.name)
    common.save_config(run_dir, cfg)

    def write() -> tuple[dict, str]:  # process 0 writes, every process reads
        data = world.write_datasets(os.path.join(run_dir, "data"), seed=cfg.seed,
                                    n_sft=cfg.n_sft, n_pref=cfg.n_pref, n_prompts=cfg.n_prompts,
                                    n_eval_prompts=cfg.n_eval_prompts)
        return data, common.tokenizer_for(run_dir, world.corpus(cfg.seed),
                                          vocab_size=cfg.vocab_size)

    data, tok = common.main_first(write)
    return run_dir, data["paths"], data["stats"], tok


def train_sft(cfg: WorldConfig, run_dir: str, paths: dict, tok: str, *,
              train_data: str | None = None, stage: str = "sft",
              model: ModelSpec | None = None) -> dict:
    arch = common.model_overrides(cfg)
    return common.completed(sft.run(sft.SFTConfig(
        data=DataConfig(train=train_data or paths["sft"], max_length=48, packing=True,
                        batch_size=cfg.sft_batch_size),
        tokenizer=tok, output_dir=os.path.join(run_dir, stage),
        model=model or ModelSpec(preset="toy-1m", overrides=arch), seed=cfg.seed,
        mesh=parse_mesh(cfg.mesh),
        optimizer=OptimizerConfig(
            learning_rate=cfg.sft_lr, warmup_steps=min(20, cfg.sft_steps // 10),
            weight_decay=0.01),
        loop=LoopConfig(total_steps=cfg.sft_steps, log_every=10, save_every=cfg.sft_steps))))


def train_rm(cfg: WorldConfig, run_dir: str, paths: dict, tok: str, sft_dir: str) -> dict:
    return common.completed(reward_model.run(reward_model.RewardModelConfig(
        data=DataConfig(train=paths["preference"], eval=paths["preference_eval"],
                        max_prompt_length=MAX_PROMPT, max_length=56,
                        batch_size=cfg.rm_batch_size, on_overflow="truncate"),
        tokenizer=tok, output_dir=os.path.join(run_dir, "reward_model"),
        model=ModelSpec(path=sft_dir), seed=cfg.seed, mesh=parse_mesh(cfg.mesh),
        optimizer=OptimizerConfig(
            learning_rate=cfg.rm_lr, warmup_steps=min(20, cfg.rm_steps // 10),
            weight_decay=0.01),
        loop=LoopConfig(total_steps=cfg.rm_steps, log_every=10,
                        eval_every=max(cfg.rm_steps // 3, 1), save_every=cfg.rm_steps))))


def train_ppo(cfg: PPOWorldConfig, run_dir: str, paths: dict, tok: str, sft_dir: str,
              rm_dir: str, *, kl_coef: float | None = None, stage: str = "ppo") -> dict:
    steps = cfg.ppo_steps
    return common.completed(ppo.run(ppo.PPOConfig(
        data=DataConfig(train=paths["prompts"], eval=paths["eval_prompts"],
                        max_prompt_length=MAX_PROMPT, batch_size=cfg.rollout_batch_size),
        tokenizer=tok, output_dir=os.path.join(run_dir, stage), policy=ModelSpec(path=sft_dir),
        rewards=RewardConfig(model=ModelSpec(path=rm_dir),
                             missing_eos_penalty=cfg.missing_eos_penalty),
        sampling=GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature),
        algorithm=ppo.PPOAlgorithmConfig(epochs=cfg.ppo_epochs,
                                         num_minibatches=cfg.num_minibatches,
                                         value_model=cfg.value_model),
        kl=KLConfig(coef=cfg.kl_coef if kl_coef is None else kl_coef, mode="reward",
                    controller=cfg.kl_controller),
        seed=cfg.seed, mesh=parse_mesh(cfg.mesh),
        optimizer=OptimizerConfig(learning_rate=cfg.ppo_lr, schedule="constant",
                                  max_grad_norm=1.0),
        loop=LoopConfig(total_steps=steps, log_every=2, eval_every=cfg.eval_every,
                        save_every=max(steps // 2, 1))),
        eval_rewards={"gold": world.gold_reward}))


def policy_report(policy_dir: str, ref_dir: str, tok_dir: str, prompts_path: str, *,
                  n: int, max_new_tokens: int, temperature: float, seed: int,
                  rm_dir: str | None = None) -> dict:
    """Sample ``n`` completions per prompt from ``policy_dir`` and report the mean gold reward,
    the proxy reward (with ``rm_dir``), the mean per-sequence KL to ``ref_dir`` (k1, i.e. the
    Monte-Carlo estimate of KL(policy || ref)) and the samples themselves."""
    tok = Tokenizer.load(tok_dir)
    prompts, rows = load_prompts(prompts_path, DataConfig(train=prompts_path,
                                                          max_prompt_length=MAX_PROMPT), tok)
    v = tok.vocab_size
    policy, params = load_model(ModelSpec(path=policy_dir), heads=("lm",), vocab_size=v,
                                seed=seed)
    ref, ref_params = load_model(ModelSpec(path=ref_dir), heads=("lm",), vocab_size=v,
                                 seed=seed)
    sample = make_sampler(policy, SamplingConfig(max_new_tokens=max_new_tokens,
                                                 eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                                 temperature=temperature, n=n))
    temp = temperature or 1.0

    @jax.jit
    def kl(pp, rp, *a):
        lp = score_completions(policy, pp, *a, temperature=temp).logprobs
        lr = score_completions(ref, rp, *a, temperature=temp).logprobs
        return jnp.sum(jnp.where(a[3], kl_k1(lp, lr), 0.0), axis=-1)

    rm_fn = None
    if rm_dir is not None:
        from rlhf_jax.models import sequence_rewards

        rm, rm_params = load_model(ModelSpec(path=rm_dir), heads=("reward",), vocab_size=v,
                                   seed=seed)
        rm_fn = jax.jit(lambda *a: sequence_rewards(rm, rm_params, *a))
    out = sample(params, prompts.tokens, prompts.mask, jax.random.PRNGKey(seed))
    args = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
    texts = decode_completions(tok, out.tokens, out.mask)
    rep = [rows[i // n] for i in range(len(texts))]
    gold = np.asarray([world.gold_score(r["prompt"], t) for r, t in zip(rep, texts)])
    report = {"gold": float(gold.mean()), "kl": float(np.asarray(kl(params, ref_params,
                                                                     *args)).mean()),
              "length": float(np.asarray(out.mask).sum(-1).mean())}
    if rm_fn is not None:
        report["proxy"] = float(np.asarray(rm_fn(*args)).mean())
    report["rows"] = rows
    report["texts"] = [texts[i * n:(i + 1) * n] for i in range(len(rows))]
    report["gold_per_sample"] = gold
    return report
