"""What every on-policy stage does around its algorithm: load and check the prompts, build the
models, resolve the rewards, run ``train.OnPolicyEngine`` in the trainer loop with periodic
evaluation (``train.RolloutEval``), export the policy.

A stage (``ppo``, ``grpo``) only says which models it needs, its ``OnPolicyAlgorithm`` and its
initial algorithm state; see ``run_onpolicy``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.models import sequence_rewards
from rlhf_jax.pipelines.config import OnPolicyConfig
from rlhf_jax.pipelines.datasets import load_prompts
from rlhf_jax.pipelines.run_dir import (config_dict, export_adapter, exported_params, finish_run,
                                        prepare_run_dir)
from rlhf_jax.pipelines.setup import (base_generation, check_sequence_fits, load_model,
                                      load_tokenizer, split_mesh, with_adapter)
from rlhf_jax.rewards import RewardFn, resolve_reward_function
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.adapters import Adapted
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
    train_width: int
    """The training prompts' padded width (a step's prompts are ``[batch_size, train_width]``)."""
    rollout_mesh: Any
    """The rollout's own mesh (``overlap.rollout_devices``), None: it samples on ``mesh``."""


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
    mesh, rollout_mesh = split_mesh(cfg.mesh, cfg.data.batch_size * group_size,
                                    cfg.overlap.rollout_devices, what=what)
    width = max(prompts.tokens.shape[1], 0 if ev is None else ev.tokens.shape[1])
    return Prepared(cfg.output_dir, tokenizer, data, rows, ev, ev_rows, mesh, generation, width,
                    report, train_width=prompts.tokens.shape[1], rollout_mesh=rollout_mesh)


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


class Loaded(NamedTuple):
    """An on-policy stage's models (``load_models``)."""

    models: Models
    params: dict
    """What trains: ``{"policy": ..., ["value": ...]}`` (with LoRA the policy's adapter)."""
    frozen: dict
    """``{"reference", "reward", "base"}`` as the stage uses them."""
    reference: tuple
    """``(model, params)`` of the reference, for evaluation."""
    adapted: Adapted | None
    """The policy's LoRA split (``setup.with_adapter``), None for full fine-tuning."""


def load_models(cfg: OnPolicyConfig, prep: Prepared, *, value_model: str | None,
                use_reference: bool) -> Loaded:
    """The policy (with a value head when ``value_model == "shared"``; a LoRA adapter with
    ``policy.lora``), the frozen reference (scored in the rollout only when ``use_reference``;
    with LoRA and no ``reference`` given, the policy's base with the adapter off), the reward
    model, a separate critic initialised from the reward model when ``value_model ==
    "separate"`` (InstructGPT). Lengths are checked against every model's positions."""
    v, seed = prep.tokenizer.vocab_size, cfg.seed
    shared = value_model == "shared"
    policy, p = load_model(cfg.policy, heads=("lm", "value") if shared else ("lm",),
                           vocab_size=v, seed=seed)
    policy, p, adapted = with_adapter(cfg.policy, policy, p, seed=seed)
    params, frozen = {"policy": p}, {}
    reference_of_base = None
    if adapted is not None:
        frozen["base"] = adapted.base
    if adapted is not None and cfg.reference is None:
        reference, reference_of_base = adapted.reference
        ref = reference_of_base(adapted.base)
    else:
        reference, ref = load_model(cfg.reference or cfg.policy, heads=("lm",), vocab_size=v,
                                    seed=seed, frozen="reference")
        if use_reference:
            frozen["reference"] = ref
    reward = critic = None
    if cfg.rewards.model is not None:
        reward, frozen["reward"] = load_model(cfg.rewards.model, heads=("reward",),
                                              vocab_size=v, seed=seed, require=("reward",),
                                              frozen="rewards.model")
    critic_lora, shared_base = False, None
    if value_model == "separate":
        init = getattr(cfg, "value_init", None) or cfg.rewards.model
        critic, cv = load_model(init, heads=("value",), vocab_size=v, seed=seed)
        critic, params["value"], critic_adapted = with_adapter(init, critic, cv, seed=seed + 1)
        if critic_adapted is not None:
            critic_lora = True
            shared_base = _shared_base(critic_adapted.base, adapted, init, cfg.policy)
            if shared_base is None:
                frozen["value_base"] = critic_adapted.base
    models = Models(policy=policy, reference=reference if use_reference else None,
                    reward=reward, critic=critic, shared_values=shared,
                    lora=adapted is not None,
                    reference_of_base=reference_of_base if use_reference else None,
                    critic_lora=critic_lora, critic_on_policy_base=shared_base)
    check_sequence_fits(models.configs() | {"reference": reference.config},
                        prompt_width=prep.prompt_width,
                        max_new_tokens=cfg.sampling.max_new_tokens)
    return Loaded(models, params, frozen, (reference, ref), adapted)


def _shared_base(critic_base, policy: Adapted | None, critic_spec, policy_spec):
    """The entries of the policy's frozen base the LoRA critic reads when both adapt one
    checkpoint stored alike (a second adapter on the same base: no second copy), else None."""
    quant = getattr(critic_spec.lora, "quantize_base", None)
    same = (policy is not None and critic_spec.path is not None
            and critic_spec.path == policy_spec.path and critic_spec.dtype == policy_spec.dtype
            and quant == policy.model.lora.quantize_base
            and critic_base.keys() <= policy.base.keys())
    return tuple(sorted(critic_base)) if same else None


def sampling_config(cfg: OnPolicyConfig, tokenizer: Tokenizer, *, n: int = 1,
                    greedy: bool = False) -> SamplingConfig:
    """The sampler's config from the stage's ``sampling`` block and the tokenizer's ids."""
    s = cfg.sampling
    return SamplingConfig(max_new_tokens=s.max_new_tokens, eos_ids=tokenizer.eos_ids,
                          pad_id=tokenizer.pad_id, n=n,
                          temperature=0.0 if greedy else s.temperature,
                          top_k=None if greedy else s.top_k, top_p=None if greedy else s.top_p)


def run_onpolicy(cfg: OnPolicyConfig, algo: OnPolicyAlgorithm, *, prep: Prepared,
                 loaded: Loaded, group_size: int, rewards: Rewards, algo_state=(),
                 eval_rewards: Mapping[str, RewardFn], greedy_eval: bool,
                 postfix: tuple[str, ...],
                 result_extra: Callable[[Any], dict] | None = None) -> dict:
    """Train with the engine (resumable), evaluate every ``loop.eval_every`` steps, export the
    policy (merged, plus the adapter alone in ``adapter/`` with LoRA) and write
    ``result.json`` (plus ``result_extra(state)``); returns the result plus ``state``,
    ``models`` and the ``evaluator``."""
    models, params, frozen, reference, adapted = loaded
    # written only now, after every data, config and model check: a refused start writes nothing
    prepare_run_dir(cfg, prep.run_dir)
    optimizer = make_optimizer(cfg.optimizer, cfg.loop.total_steps)
    engine = OnPolicyEngine(algo, models, sampling=sampling_config(cfg, prep.tokenizer,
                                                                   n=group_size),
                            optimizer=optimizer, rewards=rewards, tokenizer=prep.tokenizer,
                            rows=prep.rows, mesh=prep.mesh, rollout_mesh=prep.rollout_mesh,
                            max_staleness=cfg.overlap.max_staleness, is_cap=cfg.overlap.is_cap)
    state = engine.init(params, frozen, seed=cfg.seed, algo_state=algo_state,
                        prompt_shape=(cfg.data.batch_size, prep.train_width))
    evaluator = eval_fn = None
    if prep.eval_prompts is not None:
        rm_fn = None
        if models.reward is not None:
            rm_fn = functools.partial(jax.jit(lambda p, *a: sequence_rewards(models.reward, p,
                                                                             *a)),
                                      engine.frozen["reward"])
        ref_params = (models.reference_params(engine.frozen) if models.reference is not None
                      else reference[1])
        evaluator = RolloutEval(
            policy=models.policy, reference=reference[0], ref_params=ref_params,
            tokenizer=prep.tokenizer, prompts=prep.eval_prompts, rows=prep.eval_rows,
            sampling=sampling_config(cfg, prep.tokenizer, greedy=greedy_eval),
            reward_fns=eval_rewards, device_rewards=rm_fn, seed=cfg.seed,
            time_limit=cfg.rewards.time_limit)
        eval_fn = lambda s: evaluator(models.policy_params(s.params, engine.frozen))  # noqa
    state, _ = train_loop(cfg.loop, run_dir=prep.run_dir, state=state, step_fn=engine.step,
                          data=prep.data, eval_fn=eval_fn, postfix=postfix,
                          logging=cfg.logging, hparams=config_dict(cfg),
                          lookahead=bool(cfg.overlap.max_staleness))
    result = finish_run(prep.run_dir, models.policy.config,
                        exported_params(adapted, state.params["policy"]), prep.tokenizer, state,
                        total_steps=cfg.loop.total_steps, generation=prep.generation,
                        data=prep.data_report, **(result_extra(state) if result_extra else {}))
    if adapted is not None:
        result["adapter_dir"] = export_adapter(os.path.join(prep.run_dir, "adapter"), adapted,
                                               state.params["policy"])
    return result | {"state": state, "models": models, "evaluator": evaluator}
