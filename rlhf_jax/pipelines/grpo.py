r"""Group-relative policy optimisation and its relatives, on rewards from Python functions,
verifiers or a reward model (Shao et al. 2024; Liu et al. 2025; Yu et al. 2025; Ahmadian et al.
2024; Hu 2025).

Each iteration samples ``group_size`` completions per prompt, scores them on the host (reward
functions see decoded text, TRL-style: ``fn(prompts=..., completions=..., **columns)``) and/or
with a reward model on device, turns the rewards into advantages with the variant's estimator,
and runs ``num_iterations`` clipped-surrogate passes over the rollout in one compiled function.

The variants are rows of ``VARIANTS``, built only from ``rlhf_jax.ops`` estimators and
``losses.grpo_loss``:

=============  ===================  =============================  ==========================
variant        advantage            aggregation                    extras
=============  ===================  =============================  ==========================
grpo           (r - mean) / std     sequence mean of token means   KL in the loss (k3)
dr_grpo        r - mean             token sum / max tokens         no std, no length bias
dapo           (r - mean) / std     token mean                     clip-higher 0.28, overlong
                                                                   filter, dynamic sampling
rloo           leave-one-out mean   token mean                     \-
reinforce_pp   batch-whitened r     token mean                     \-
=============  ===================  =============================  ==========================

Dynamic sampling keeps shapes fixed: groups whose rewards are all equal (zero advantage, no
signal) are masked out of the loss and its denominator instead of being re-sampled, which is
what removing them from the batch does to a token-mean loss; the fraction kept is logged.

With one update per rollout (``num_iterations == 1`` and ``num_minibatches == 1``;
``reuse_logprobs``, on by default) the policy that sampled is the policy being updated, so the
"old" log-probs are the current ones:
``old = stop_gradient(logp)``, the ratio is exactly 1 and its gradient is the policy gradient.
The rollout then skips a full scoring pass of the policy (as TRL does in that case); the
sampler-vs-trainer log-prob gap is measured inside the update instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.losses import grpo_loss
from rlhf_jax.models import score_completions, sequence_rewards
from rlhf_jax.ops import (group_advantages, masked_mean, reinforce_pp_advantages,
                          rloo_advantages)
from rlhf_jax.ops.stats import Mean
from rlhf_jax.parallel import MeshConfig, batch_sharding, fetch, from_main, replicated
from rlhf_jax.pipelines.common import (ModelSpec, check_sequence_fits, finish_run, load_model,
                                       make_mesh, model_shardings, place, prepare_run_dir)
from rlhf_jax.pipelines.rollouts import (RewardFn, RolloutEval, call_reward_fns,
                                         decode_completions, load_prompts)
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import (LoopConfig, OptimizerConfig, create_train_state, make_optimizer,
                            minibatch_updates, state_shardings, step_key, train_loop)


def _adv_group(r, mask, g):
    return group_advantages(r, group_size=g, scale_by_std=True)


def _adv_group_no_std(r, mask, g):
    return group_advantages(r, group_size=g, scale_by_std=False)


def _adv_rloo(r, mask, g):
    return rloo_advantages(r, group_size=g)


def _adv_reinforce_pp(r, mask, g):
    last = jax.nn.one_hot(jnp.sum(mask, -1) - 1, mask.shape[1])
    return reinforce_pp_advantages(r[:, None] * last, mask)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the variant table."""

    advantage: Callable
    aggregation: str
    clip_eps_high: float | None = None
    overlong_filter: bool = False
    dynamic_sampling: bool = False


VARIANTS: dict[str, Variant] = {
    "grpo": Variant(_adv_group, "seq_mean_token_mean"),
    "dr_grpo": Variant(_adv_group_no_std, "seq_mean_token_sum_norm"),
    "dapo": Variant(_adv_group, "token_mean", clip_eps_high=0.28, overlong_filter=True,
                    dynamic_sampling=True),
    "rloo": Variant(_adv_rloo, "token_mean"),
    "reinforce_pp": Variant(_adv_reinforce_pp, "token_mean"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Group-sampled policy optimisation with a variant from ``VARIANTS``."""

    prompts: str
    """Prompt JSONL; extra columns (e.g. ``answer``) are passed to reward functions."""
    tokenizer: str
    policy: ModelSpec
    reference: ModelSpec | None = None
    reward_model: ModelSpec | None = None
    """Optional reward model, added to the reward functions' sum with ``reward_model_weight``."""
    reward_model_weight: float = 1.0
    variant: str = "grpo"
    eval_prompts: str | None = None
    output_dir: str = "runs/grpo"
    max_prompt_length: int = 16
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    prompts_per_step: int = 16
    group_size: int = 4
    num_iterations: int = 1
    """Passes over each rollout (mu in the GRPO paper)."""
    num_minibatches: int = 1
    reuse_logprobs: bool = True
    """With one update per rollout (``num_iterations == num_minibatches == 1``) take the "old"
    log-probs from the update's own forward pass (ratio 1) instead of scoring the policy a second
    time after sampling; False always scores it (same numbers to float rounding, slower)."""
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None
    """Overrides the variant's (None: the variant's, or ``clip_eps_low``)."""
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    max_tokens: int | None = None
    """Normaliser of ``seq_mean_token_sum_norm`` (default ``max_new_tokens``)."""
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5, schedule="constant",
                                                 total_steps=100)
    loop: LoopConfig = LoopConfig(total_steps=100, log_every=5, eval_every=25, save_every=50)
    mesh: MeshConfig | None = MeshConfig()
    """Devices per ``data``/``fsdp``/``tensor`` axis (``parallel.MeshConfig``; default: every
    device data-parallel); None runs on one device. Not part of the run's identity: a run
    resumes on another mesh."""
    skip_invalid: bool = False
    """Skip (and count) malformed prompt rows instead of stopping at the first."""
    on_overflow: str = "error"
    """Prompts longer than ``max_prompt_length``: ``error`` or ``skip`` (never truncated)."""
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group baselines, got {self.group_size}")
        if (self.prompts_per_step * self.group_size) % self.num_minibatches:
            raise ValueError("prompts_per_step * group_size must be divisible by num_minibatches")


def make_grpo_functions(cfg: GRPOConfig, policy, reference, sampling, optimizer):
    """``rollout(state, ref_params, prompts, mask)`` and ``update(state, batch, rewards)``."""
    var = VARIANTS[cfg.variant]
    temp = sampling.temperature or 1.0
    sample = make_sampler(policy, sampling)
    clip_high = cfg.clip_eps_high if cfg.clip_eps_high is not None else var.clip_eps_high
    max_tokens = cfg.max_tokens or cfg.max_new_tokens
    use_ref = cfg.kl_coef > 0
    on_policy = cfg.reuse_logprobs and cfg.num_iterations == 1 and cfg.num_minibatches == 1

    def rollout(state, ref_params, prompt, prompt_mask):
        out = sample(state.params, prompt, prompt_mask, step_key(state))
        args = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
        old = (out.logprobs if on_policy  # the update's own log-probs serve as "old"
               else score_completions(policy, state.params, *args, temperature=temp).logprobs)
        ref = (score_completions(reference, ref_params, *args, temperature=temp).logprobs
               if use_ref else jnp.zeros_like(old))
        diff = masked_mean(jnp.abs(out.logprobs - old), out.mask)
        return out, old, ref, diff

    def update(state, out, old, ref, rewards):
        mask = out.mask
        adv = var.advantage(rewards, mask, cfg.group_size)
        g = rewards.reshape(-1, cfg.group_size)
        live = jnp.ones_like(rewards, bool)
        if var.dynamic_sampling:
            live = jnp.repeat(jnp.max(g, 1) > jnp.min(g, 1), cfg.group_size)
        if var.overlong_filter:
            live = live & ~out.truncated
        loss_mask = mask & live[:, None]
        batch = (out.prompt_tokens, out.prompt_mask, out.tokens, loss_mask, old, ref, adv)

        def loss_fn(params, mb, _key):
            p, pm, c, m, o, r, a = mb
            lp = score_completions(policy, params, p, pm, c, m, temperature=temp).logprobs
            extra = {}
            if on_policy:  # o holds the sampler's log-probs: measure the gap, then use lp
                extra = {"logprob_diff_sampler_trainer": Mean(
                    jnp.sum(jnp.where(m, jnp.abs(o - lp), 0.0)), jnp.sum(m, dtype=jnp.float32))}
                o = jax.lax.stop_gradient(lp)
            total, count, metrics = grpo_loss(
                lp, o, a, m, ref_logp=r if use_ref else None, kl_coef=cfg.kl_coef,
                kl_estimator=cfg.kl_estimator, clip_eps_low=cfg.clip_eps_low,
                clip_eps_high=clip_high, aggregation=var.aggregation, max_tokens=max_tokens)
            return total, count, metrics | extra

        params, opt_state, bad, metrics = minibatch_updates(
            loss_fn, optimizer, state.params, state.opt_state, batch,
            jax.random.fold_in(step_key(state), 1), epochs=cfg.num_iterations,
            num_minibatches=cfg.num_minibatches)
        fm = mask.astype(jnp.float32)
        metrics |= {"reward": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                    "reward_group_std": jnp.mean(jnp.std(g, 1)),
                    "response_length": jnp.mean(jnp.sum(fm, -1)),
                    "truncated_frac": jnp.mean(out.truncated.astype(jnp.float32)),
                    "kept_frac": jnp.mean(live.astype(jnp.float32)),
                    "update_skipped": bad.astype(jnp.float32)}
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                             skipped=jnp.where(bad > 0, state.skipped + 1, 0).astype(jnp.int32))
        return new, metrics

    return rollout, update


def _compile(policy, reference, state, ref_params, mesh, rollout, update):
    """Jit ``rollout`` and ``update``; with a mesh, place the policy state and the reference by
    their families' sharding rules. The prompts come in replicated (``prompts_per_step`` need not
    divide the mesh) and the ``prompts x group_size`` completions leave the sampler split over
    ``data x fsdp``, so generation, scoring and the update all run sharded.
    Returns ``(rollout_jit, update_jit, state, ref_params, rows)``."""
    if mesh is None:
        return jax.jit(rollout), jax.jit(update, donate_argnums=(0,)), state, ref_params, None
    st_sh = state_shardings(state, mesh, model_shardings(mesh, policy.config, state.params))
    ref_sh = model_shardings(mesh, reference.config, ref_params)
    rep, rows = replicated(mesh), batch_sharding(mesh)
    rollout_jit = jax.jit(rollout, in_shardings=(st_sh, ref_sh, rep, rep),
                          out_shardings=(rows, rows, rows, rep))
    update_jit = jax.jit(update, in_shardings=(st_sh, rows, rows, rows, rows),
                         out_shardings=(st_sh, rep), donate_argnums=(0,))
    prompts_jit = lambda st, rp, p, m: rollout_jit(st, rp, *place((p, m), rep))  # noqa: E731
    return prompts_jit, update_jit, place(state, st_sh), place(ref_params, ref_sh), rows


def run(cfg: GRPOConfig, *, reward_fns: Mapping[str, RewardFn] | None = None,
        reward_weights: Mapping[str, float] | None = None,
        eval_rewards: Mapping[str, RewardFn] | None = None) -> dict:
    """Train with the configured variant. The reward of a completion is
    ``sum_f w_f * f(...) + reward_model_weight * RM(...)``; eval reports each function's mean."""
    reward_fns = dict(reward_fns or {})
    if not reward_fns and cfg.reward_model is None:
        raise ValueError("GRPO needs reward_fns or a reward_model")
    weights = {k: float((reward_weights or {}).get(k, 1.0)) for k in reward_fns}
    run_dir = prepare_run_dir(cfg, cfg.output_dir)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    prompts, rows = load_prompts(cfg.prompts, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                 skip_invalid=cfg.skip_invalid, on_overflow=cfg.on_overflow)
    ev_prompts, ev_rows = (load_prompts(cfg.eval_prompts, tokenizer,
                                        max_prompt_length=cfg.max_prompt_length,
                                        skip_invalid=cfg.skip_invalid,
                                        on_overflow=cfg.on_overflow)
                           if cfg.eval_prompts else (None, None))
    # Every data and config check before the models are built or anything compiled.
    index = np.arange(len(rows), dtype=np.int32)
    data = BatchIterator((prompts, index), batch_size=cfg.prompts_per_step, seed=cfg.seed)
    mesh = make_mesh(cfg.mesh, cfg.prompts_per_step * cfg.group_size,
                     what="prompts_per_step * group_size")
    v = tokenizer.vocab_size
    policy, params = load_model(cfg.policy, heads=("lm",), vocab_size=v, seed=cfg.seed)
    reference, ref_params = load_model(cfg.reference or cfg.policy, heads=("lm",),
                                       vocab_size=v, seed=cfg.seed)
    rm_score, configs = None, {"policy": policy.config, "reference": reference.config}
    if cfg.reward_model is not None:
        rm, rm_params = load_model(cfg.reward_model, heads=("reward",), vocab_size=v,
                                   seed=cfg.seed)
        configs["reward"] = rm.config
    check_sequence_fits(configs, max_prompt_length=cfg.max_prompt_length,
                        max_new_tokens=cfg.max_new_tokens)
    if cfg.reward_model is not None:
        rm_params = place(rm_params, model_shardings(mesh, rm.config, rm_params))
        rm_score = functools.partial(jax.jit(lambda p, *a: sequence_rewards(rm, p, *a)),
                                     rm_params)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, n=cfg.group_size)
    optimizer = make_optimizer(cfg.optimizer)
    state = create_train_state(params, optimizer, seed=cfg.seed)
    rollout, update = make_grpo_functions(cfg, policy, reference, sampling, optimizer)
    rollout_jit, update_jit, state, ref_params, batch_rows = _compile(
        policy, reference, state, ref_params, mesh, rollout, update)
    columns = [k for k in rows[0] if k != "prompt"]

    def step_fn(state, batch):
        prompt_batch, index = batch
        out, old, ref, diff = rollout_jit(state, ref_params, prompt_batch.tokens,
                                          prompt_batch.mask)
        texts = decode_completions(tokenizer, *fetch((out.tokens, out.mask)))
        rep = np.repeat(np.asarray(index), cfg.group_size)
        cols = {c: [rows[i].get(c) for i in rep] for c in columns}
        scores = call_reward_fns(reward_fns, [rows[i]["prompt"] for i in rep], texts, cols)
        total = sum((weights[k] * s for k, s in scores.items()), np.zeros(len(texts), np.float32))
        if rm_score is not None:
            rms = fetch(rm_score(out.prompt_tokens, out.prompt_mask, out.tokens, out.mask))
            scores["reward_model"] = rms
            total = total + cfg.reward_model_weight * rms
        # reward functions run on every process; process 0's values are the ones trained on
        total = from_main(np.asarray(total, np.float32))
        state, metrics = update_jit(state, out, old, ref, place(total, batch_rows))
        metrics |= {f"rewards/{k}": float(s.mean()) for k, s in scores.items()}
        return state, {"logprob_diff_sampler_trainer": diff} | metrics  # on-policy: update's

    eval_fn = None
    if cfg.eval_prompts:
        greedy = dataclasses.replace(sampling, n=1, temperature=0.0, top_k=None, top_p=None)
        evaluator = RolloutEval(policy=policy, reference=reference, ref_params=ref_params,
                                tokenizer=tokenizer, prompts=ev_prompts, rows=ev_rows,
                                sampling=greedy, reward_fns=eval_rewards or reward_fns,
                                device_rewards=rm_score, seed=cfg.seed)
        eval_fn = lambda s: evaluator(s.params)  # noqa: E731
    state, history = train_loop(cfg.loop, run_dir=run_dir, state=state, step_fn=step_fn,
                                data=data, eval_fn=eval_fn, postfix=("reward", "loss"))
    result = finish_run(run_dir, policy.config, state.params, tokenizer, state,
                        total_steps=cfg.loop.total_steps)
    return result | {"state": state, "policy": policy}
