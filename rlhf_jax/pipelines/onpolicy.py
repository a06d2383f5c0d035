"""What every on-policy stage does around its algorithm: load and check the prompts, build the
models, resolve the rewards, run ``train.OnPolicyEngine`` in the trainer loop with periodic
evaluation (``train.RolloutEval``), export the policy.

A stage (``ppo``, ``grpo``) only says which models it needs, its ``OnPolicyAlgorithm`` and its
initial algorithm state; see ``run_onpolicy``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.models import sequence_rewards
from rlhf_jax.pipelines.config import OnPolicyConfig
from rlhf_jax.pipelines.datasets import load_prompts
from rlhf_jax.pipelines.run_dir import config_dict, finish_run, prepare_run_dir
from rlhf_jax.pipelines.setup import (base_generation, check_sequence_fits, load_model,
                                      load_tokenizer, make_mesh)
from rlhf_jax.rewards import RewardFn, resolve_reward_function
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import (Models, OnPolicyAlgorithm, OnPolicyEngine, Rewards, RolloutEval,
                            make_optimizer, train_loop)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A stage's checked inputs, before any model is built."""

    run_dir: str
    """``cfg.output_dir``, created (with ``config.json``) by ``run_onpolicy``."""
    tokenizer: Tokenizer
    data: BatchIterator
    rows: list
    eval_prompts: Any
    eval_rows: list | None
    mesh: Any
    generation: dict
    """The policy checkpoint's generation config (its sampling defaults go into the export)."""
    prompt_width: int
    """The prompts' padded width (training and evaluation): the sampler's prompt slots."""
    data_report: dict
    """Rows per data file, and those skipped (``result.json``'s ``data``)."""


def prepare(cfg: OnPolicyConfig, *, group_size: int) -> Prepared:
    """Tokenizer (by default the policy checkpoint's, checked against every checkpoint's),
    prompts and mesh: every data and config check before the models are built, anything
    compiled or the run directory written."""
    tokenizer = load_tokenizer(cfg.tokenizer, "policy", cfg.policy, others={
        "reference": cfg.reference, "rewards.model": cfg.rewards.model,
        "value_init": getattr(cfg, "value_init", None)}, chat_template=cfg.data.chat_template)
    generation = base_generation(cfg.policy)
    report: dict = {}
    prompts, rows = load_prompts(cfg.data.train, cfg.data, tokenizer, report=report)
    ev, ev_rows = (load_prompts(cfg.data.eval, cfg.data, tokenizer, report=report)
                   if cfg.data.eval else (None, None))
    index = np.arange(len(rows), dtype=np.int32)
    data = BatchIterator((prompts, index), batch_size=cfg.data.batch_size, seed=cfg.seed)
    what = "data.batch_size" + (f" * group_size ({group_size})" if group_size > 1 else "")
    mesh = make_mesh(cfg.mesh, cfg.data.batch_size * group_size, what=what)
    width = max(prompts.tokens.shape[1], 0 if ev is None else ev.tokens.shape[1])
    return Prepared(cfg.output_dir, tokenizer, data, rows, ev, ev_rows, mesh, generation, width,
                    report)


def reward_functions(cfg: OnPolicyConfig, given: Mapping[str, RewardFn] | None,
                     weights: Mapping[str, float] | None) -> tuple[dict, dict]:
    """The configured (``rewards.functions``, by name) and the given callables, and their
    weights (1 unless set)."""
    fns = {name: resolve_reward_function(name) for name in cfg.rewards.functions}
    cfg_w = dict(zip(cfg.rewards.functions, cfg.rewards.weights or ()))
    clash = set(fns) & set(given or {})
    if clash:
        raise ValueError(f"reward functions {sorted(clash)} are both configured and given")
    fns |= dict(given or {})
    w = {k: float({**cfg_w, **(weights or {})}.get(k, 1.0)) for k in fns}
    return fns, w


def engine_rewards(cfg: OnPolicyConfig, fns: Mapping[str, RewardFn],
                   weights: Mapping[str, float]) -> Rewards:
    """The engine's ``Rewards`` from the ``rewards`` block and the resolved functions."""
    r = cfg.rewards
    return Rewards(functions=fns, weights=weights, model_weight=r.model_weight,
                   missing_eos_penalty=r.missing_eos_penalty, non_finite=r.non_finite,
                   time_limit=r.time_limit)


def load_models(cfg: OnPolicyConfig, prep: Prepared, *, value_model: str | None,
                use_reference: bool) -> tuple[Models, dict, dict, Any]:
    """``(models, trained params, frozen params, the reference for evaluation)``: the policy
    (with a value head when ``value_model == "shared"``), the frozen reference (scored in the
    rollout only when ``use_reference``), the reward model, a separate critic initialised from
    the reward model when ``value_model == "separate"`` (InstructGPT). Lengths are checked
    against every model's positions."""
    v, seed = prep.tokenizer.vocab_size, cfg.seed
    shared = value_model == "shared"
    policy, p = load_model(cfg.policy, heads=("lm", "value") if shared else ("lm",),
                           vocab_size=v, seed=seed)
    reference, ref = load_model(cfg.reference or cfg.policy, heads=("lm",), vocab_size=v,
                                seed=seed)
    params, frozen = {"policy": p}, {}
    reward = critic = None
    if cfg.rewards.model is not None:
        reward, frozen["reward"] = load_model(cfg.rewards.model, heads=("reward",),
                                              vocab_size=v, seed=seed, require=("reward",))
    if value_model == "separate":
        init = getattr(cfg, "value_init", None) or cfg.rewards.model
        critic, params["value"] = load_model(init, heads=("value",), vocab_size=v, seed=seed)
    if use_reference:
        frozen["reference"] = ref
    models = Models(policy=policy, reference=reference if use_reference else None,
                    reward=reward, critic=critic, shared_values=shared)
    check_sequence_fits(models.configs() | {"reference": reference.config},
                        prompt_width=prep.prompt_width,
                        max_new_tokens=cfg.sampling.max_new_tokens)
    return models, params, frozen, (reference, ref)


def sampling_config(cfg: OnPolicyConfig, tokenizer: Tokenizer, *, n: int = 1,
                    greedy: bool = False) -> SamplingConfig:
    """The sampler's config from the stage's ``sampling`` block and the tokenizer's ids."""
    s = cfg.sampling
    return SamplingConfig(max_new_tokens=s.max_new_tokens, eos_ids=tokenizer.eos_ids,
                          pad_id=tokenizer.pad_id, n=n,
                          temperature=0.0 if greedy else s.temperature,
                          top_k=None if greedy else s.top_k, top_p=None if greedy else s.top_p)


def run_onpolicy(cfg: OnPolicyConfig, algo: OnPolicyAlgorithm, *, prep: Prepared,
                 models: Models, params: dict, frozen: dict, reference, group_size: int,
                 rewards: Rewards, algo_state=(), eval_rewards: Mapping[str, RewardFn],
                 greedy_eval: bool, postfix: tuple[str, ...],
                 result_extra: Callable[[Any], dict] | None = None) -> dict:
    """Train with the engine (resumable), evaluate every ``loop.eval_every`` steps, export the
    policy and write ``result.json`` (plus ``result_extra(state)``); returns the result plus
    ``state``, ``models`` and the ``evaluator``."""
    # written only now, after every data, config and model check: a refused start writes nothing
    prepare_run_dir(cfg, prep.run_dir)
    optimizer = make_optimizer(cfg.optimizer, cfg.loop.total_steps)
    engine = OnPolicyEngine(algo, models, sampling=sampling_config(cfg, prep.tokenizer,
                                                                   n=group_size),
                            optimizer=optimizer, rewards=rewards, tokenizer=prep.tokenizer,
                            rows=prep.rows, mesh=prep.mesh)
    state = engine.init(params, frozen, seed=cfg.seed, algo_state=algo_state)
    evaluator = eval_fn = None
    if prep.eval_prompts is not None:
        rm_fn = None
        if models.reward is not None:
            rm_fn = functools.partial(jax.jit(lambda p, *a: sequence_rewards(models.reward, p,
                                                                             *a)),
                                      engine.frozen["reward"])
        evaluator = RolloutEval(
            policy=models.policy, reference=reference[0],
            ref_params=engine.frozen.get("reference", reference[1]),
            tokenizer=prep.tokenizer, prompts=prep.eval_prompts, rows=prep.eval_rows,
            sampling=sampling_config(cfg, prep.tokenizer, greedy=greedy_eval),
            reward_fns=eval_rewards, device_rewards=rm_fn, seed=cfg.seed,
            time_limit=cfg.rewards.time_limit)
        eval_fn = lambda s: evaluator(s.params["policy"])  # noqa: E731
    state, _ = train_loop(cfg.loop, run_dir=prep.run_dir, state=state, step_fn=engine.step,
                          data=prep.data, eval_fn=eval_fn, postfix=postfix,
                          logging=cfg.logging, hparams=config_dict(cfg))
    result = finish_run(prep.run_dir, models.policy.config, state.params["policy"],
                        prep.tokenizer, state, total_steps=cfg.loop.total_steps,
                        generation=prep.generation, data=prep.data_report,
                        **(result_extra(state) if result_extra else {}))
    return result | {"state": state, "models": models, "evaluator": evaluator}
