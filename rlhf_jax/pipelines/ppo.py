"""PPO against a reward model with a KL penalty to a frozen reference (Ziegler et al. 2019;
Ouyang et al. 2022), as two compiled functions per iteration.

1. ``rollout(state, prompts)``: sample completions (KV-cached sampler), then score them: the
   policy's log-probs and entropy, the reference's log-probs, values, and the reward model's
   score at the last token. KL enters either the per-token reward (``kl_mode="reward"``,
   ``r_t = -beta * k1_t``, the score added at the last token) or the loss
   (``kl_mode="loss"``, ``beta * k2/k3`` per token). GAE gives advantages (whitened) and returns.
2. ``update(state, rollout)``: ``ppo_epochs`` passes over the rollout, each shuffled into
   ``num_minibatches`` minibatches, all inside one ``lax.scan``: clipped policy loss, clipped value
   loss, entropy bonus; one guarded optimizer update per minibatch; then the KL controller
   (fixed or adaptive) moves ``beta`` from the rollout's observed KL.

The value function is a head on the policy (``value_model="shared"``) or a separate critic
initialised from the reward model (``"separate"``, as InstructGPT). Config and math live here;
the loop, checkpoints and logging are ``train.train_loop``'s.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import BatchIterator, Tokenizer
from rlhf_jax.losses import entropy_bonus, ppo_policy_loss, value_loss
from rlhf_jax.models import completion_values, score_completions, sequence_rewards
from rlhf_jax.ops import (KL_CONTROLLERS, KL_ESTIMATORS, aggregate_loss, gae_advantages,
                          kl_controller_init, kl_k1, masked_mean, masked_whiten)
from rlhf_jax.ops.stats import Mean
from rlhf_jax.parallel import MeshConfig, batch_sharding, replicated
from rlhf_jax.pipelines.common import (ModelSpec, check_sequence_fits, finish_run, load_model,
                                       make_mesh, model_shardings, place, prepare_run_dir)
from rlhf_jax.pipelines.rollouts import RewardFn, RolloutEval, load_prompts
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import (LoopConfig, OptimizerConfig, create_train_state, make_optimizer,
                            minibatch_updates, state_shardings, step_key, train_loop)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO with a reward model, a frozen reference and GAE."""

    prompts: str
    """Prompt-only JSONL (``prompt`` and any extra columns)."""
    tokenizer: str
    policy: ModelSpec
    """Usually the SFT model's directory."""
    reward_model: ModelSpec
    reference: ModelSpec | None = None
    """Frozen reference policy; default: the initial policy."""
    value_model: str = "separate"
    """``separate`` (a critic initialised from ``value_init``) or ``shared`` (a policy head)."""
    value_init: ModelSpec | None = None
    """Critic initialisation; default: the reward model (InstructGPT)."""
    eval_prompts: str | None = None
    output_dir: str = "runs/ppo"
    max_prompt_length: int = 16
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    rollout_batch_size: int = 64
    """Prompts sampled per iteration (one completion each)."""
    ppo_epochs: int = 2
    num_minibatches: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    """Weight of the entropy bonus; 0 skips the update's entropy pass over the vocabulary. The
    logged ``entropy`` is the sampling policy's (rollout); with a bonus, ``policy/entropy`` is
    the updated policy's."""
    kl_mode: str = "reward"
    """``reward``: k1 in the per-token reward; ``loss``: ``kl_estimator`` in the loss."""
    kl_estimator: str = "k3"
    kl_coef: float = 0.05
    kl_controller: str = "fixed"
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    whiten_advantages: bool = True
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of completions that hit ``max_new_tokens`` without an EOS."""
    aggregation: str = "token_mean"
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-5, schedule="constant",
                                                 total_steps=100, max_grad_norm=1.0)
    loop: LoopConfig = LoopConfig(total_steps=100, log_every=5, eval_every=20, save_every=50)
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
        if self.value_model not in ("separate", "shared"):
            raise ValueError(f"value_model must be 'separate' or 'shared', got "
                             f"{self.value_model!r}")
        if self.kl_mode not in ("reward", "loss"):
            raise ValueError(f"kl_mode must be 'reward' or 'loss', got {self.kl_mode!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}")
        if self.kl_controller not in KL_CONTROLLERS:
            raise ValueError(f"kl_controller must be one of {sorted(KL_CONTROLLERS)}")
        if self.rollout_batch_size % self.num_minibatches:
            raise ValueError(f"rollout_batch_size {self.rollout_batch_size} is not divisible by "
                             f"num_minibatches {self.num_minibatches}")
        if self.ppo_epochs < 1:
            raise ValueError("ppo_epochs must be >= 1")


class Rollout(NamedTuple):
    prompt: jax.Array        # [B, P]
    prompt_mask: jax.Array   # [B, P]
    completion: jax.Array    # [B, C]
    mask: jax.Array          # [B, C]
    old_logp: jax.Array      # [B, C]
    ref_logp: jax.Array      # [B, C]
    old_values: jax.Array    # [B, C]
    advantages: jax.Array    # [B, C]
    returns: jax.Array       # [B, C]


class Models(NamedTuple):
    policy: object
    critic: object | None
    reference: object
    reward: object


def _build(cfg: PPOConfig, tokenizer: Tokenizer):
    v = tokenizer.vocab_size
    shared = cfg.value_model == "shared"
    policy, p_params = load_model(cfg.policy, heads=("lm", "value") if shared else ("lm",),
                                  vocab_size=v, seed=cfg.seed)
    reference, ref_params = load_model(cfg.reference or cfg.policy, heads=("lm",),
                                       vocab_size=v, seed=cfg.seed)
    reward, rm_params = load_model(cfg.reward_model, heads=("reward",), vocab_size=v,
                                   seed=cfg.seed)
    params = {"policy": p_params}
    critic = None
    if not shared:
        critic, params["value"] = load_model(cfg.value_init or cfg.reward_model,
                                             heads=("value",), vocab_size=v, seed=cfg.seed)
    return Models(policy, critic, reference, reward), params, (ref_params, rm_params)


def make_ppo_functions(cfg: PPOConfig, models: Models, sampling: SamplingConfig, optimizer):
    """The two pure functions of an iteration: ``rollout`` and ``update`` (unjitted)."""
    temp = sampling.temperature or 1.0
    sample = make_sampler(models.policy, sampling)
    shared = models.critic is None

    def values_of(params, prompt, pmask, comp, cmask, scores):
        if shared:
            return scores.values
        return completion_values(models.critic, params["value"], prompt, pmask, comp, cmask)

    def rollout(state, frozen, prompt, prompt_mask):
        ref_params, rm_params = frozen
        out = sample(state.params["policy"], prompt, prompt_mask, step_key(state))
        m = out.mask
        args = (out.prompt_tokens, out.prompt_mask, out.tokens, m)
        pol = score_completions(models.policy, state.params["policy"], *args, temperature=temp,
                                entropy=True, values=shared)
        ref = score_completions(models.reference, ref_params, *args, temperature=temp)
        values = values_of(state.params, *args, pol)
        score = sequence_rewards(models.reward, rm_params, *args)
        score = score - cfg.missing_eos_penalty * out.truncated
        kl = jnp.where(m, kl_k1(pol.logprobs, ref.logprobs), 0.0)
        last = jax.nn.one_hot(jnp.sum(m, -1) - 1, m.shape[1]) * (jnp.sum(m, -1) > 0)[:, None]
        rewards = score[:, None] * last
        if cfg.kl_mode == "reward":
            rewards = rewards - state.algo.kl_coef * kl
        adv, ret = gae_advantages(rewards, values, m, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, m)
        seq_kl = jnp.sum(kl, -1)
        fm = m.astype(jnp.float32)
        metrics = {
            "score": jnp.mean(score), "score_std": jnp.std(score),
            "kl": jnp.mean(seq_kl), "kl_coef": state.algo.kl_coef,
            "entropy": masked_mean(pol.entropy, m),
            "response_length": jnp.mean(jnp.sum(fm, -1)),
            "truncated_frac": jnp.mean(out.truncated.astype(jnp.float32)),
            "non_score_reward": -state.algo.kl_coef * jnp.mean(seq_kl),
            "logprob_diff_sampler_trainer": masked_mean(jnp.abs(out.logprobs - pol.logprobs), m),
        }
        batch = Rollout(out.prompt_tokens, out.prompt_mask, out.tokens, m, pol.logprobs,
                        ref.logprobs, values, adv, ret)
        return batch, metrics

    def loss_fn(params, mb: Rollout, kl_coef):
        args = (mb.prompt, mb.prompt_mask, mb.completion, mb.mask)
        use_entropy = cfg.entropy_coef != 0  # else skip a second pass over the vocabulary
        sc = score_completions(models.policy, params["policy"], *args, temperature=temp,
                               entropy=use_entropy, values=shared)
        agg = dict(aggregation=cfg.aggregation)
        pl, count, pm = ppo_policy_loss(sc.logprobs, mb.old_logp, mb.advantages, mb.mask,
                                        clip_eps_low=cfg.clip_eps_low,
                                        clip_eps_high=cfg.clip_eps_high,
                                        dual_clip=cfg.dual_clip, **agg)
        vl, _, vm = value_loss(values_of(params, *args, sc), mb.old_values, mb.returns, mb.mask,
                               clip_eps=cfg.value_clip, **agg)
        total = pl + cfg.vf_coef * vl
        em = {}  # "entropy" is the sampling policy's, from the rollout, either way
        if use_entropy:
            el, _, em = entropy_bonus(sc.entropy, mb.mask, coef=cfg.entropy_coef, **agg)
            em = {f"policy/{k}": v for k, v in em.items()}  # under the updated params
            total = total + el
        metrics = {f"policy/{k}": v for k, v in pm.items()} | {f"value/{k}": v
                                                                for k, v in vm.items()}
        metrics |= {"policy_loss": Mean(pl, count), "value_loss": Mean(vl, count)} | em
        if cfg.kl_mode == "loss":
            k = jnp.where(mb.mask, KL_ESTIMATORS[cfg.kl_estimator](sc.logprobs, mb.ref_logp),
                          0.0)
            kl_sum, _ = aggregate_loss(k, mb.mask, mode=cfg.aggregation)
            total = total + kl_coef * kl_sum
            metrics["kl_loss"] = Mean(kl_sum, count)
        return total, count, metrics

    def update(state, batch: Rollout, rollout_kl):
        b = batch.completion.shape[0]
        kl_coef = state.algo.kl_coef
        params, opt_state, bad, metrics = minibatch_updates(
            lambda p, d, _k: loss_fn(p, d, kl_coef), optimizer, state.params, state.opt_state,
            batch, jax.random.fold_in(step_key(state), 1), epochs=cfg.ppo_epochs,
            num_minibatches=cfg.num_minibatches)
        algo = KL_CONTROLLERS[cfg.kl_controller](state.algo, observed_kl=rollout_kl,
                                                 n_steps=b, target=cfg.kl_target,
                                                 horizon=cfg.kl_horizon)
        metrics["update_skipped"] = bad.astype(jnp.float32)
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state, algo=algo,
                             skipped=jnp.where(bad > 0, state.skipped + 1, 0).astype(jnp.int32))
        return new, metrics

    return rollout, update


def _compile(cfg: PPOConfig, models: Models, state, frozen, mesh, rollout, update):
    """Jit ``rollout`` and ``update``; with a mesh, place the policy/value state and the frozen
    reference and reward models by their families' sharding rules and split the rollout batch
    over ``data x fsdp``. Returns ``(rollout_jit, update_jit, state, frozen, rows)``."""
    if mesh is None:
        return jax.jit(rollout), jax.jit(update, donate_argnums=(0,)), state, frozen, None
    p_sh = {"policy": model_shardings(mesh, models.policy.config, state.params["policy"])}
    if models.critic is not None:
        p_sh["value"] = model_shardings(mesh, models.critic.config, state.params["value"])
    st_sh = state_shardings(state, mesh, p_sh)
    fz_sh = (model_shardings(mesh, models.reference.config, frozen[0]),
             model_shardings(mesh, models.reward.config, frozen[1]))
    rep, rows = replicated(mesh), batch_sharding(mesh)
    rollout_jit = jax.jit(rollout, in_shardings=(st_sh, fz_sh, rows, rows),
                          out_shardings=(rows, rep))
    update_jit = jax.jit(update, in_shardings=(st_sh, rows, rep), out_shardings=(st_sh, rep),
                         donate_argnums=(0,))
    return rollout_jit, update_jit, place(state, st_sh), place(frozen, fz_sh), rows


def run(cfg: PPOConfig, *, eval_rewards: Mapping[str, RewardFn] | None = None) -> dict:
    """Train the policy with PPO; ``eval_rewards`` (e.g. a task's gold scorer) are reported at
    every evaluation alongside the reward model's score and the KL to the reference."""
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
    data = BatchIterator(prompts, batch_size=cfg.rollout_batch_size, seed=cfg.seed)
    mesh = make_mesh(cfg.mesh, cfg.rollout_batch_size, what="rollout_batch_size")
    models, params, frozen = _build(cfg, tokenizer)
    check_sequence_fits({name: m.config for name, m in models._asdict().items() if m is not None},
                        max_prompt_length=cfg.max_prompt_length,
                        max_new_tokens=cfg.max_new_tokens)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p)
    optimizer = make_optimizer(cfg.optimizer)
    state = create_train_state(params, optimizer, seed=cfg.seed,
                               algo=kl_controller_init(cfg.kl_coef))
    rollout, update = make_ppo_functions(cfg, models, sampling, optimizer)
    rollout_jit, update_jit, state, frozen, rows = _compile(cfg, models, state, frozen, mesh,
                                                            rollout, update)

    def step_fn(state, batch):
        ro, ro_metrics = rollout_jit(state, frozen, *place((batch.tokens, batch.mask), rows))
        state, up_metrics = update_jit(state, ro, ro_metrics["kl"])
        return state, ro_metrics | up_metrics

    eval_fn = None
    evaluator = None
    if cfg.eval_prompts:
        rm_fn = functools.partial(jax.jit(lambda rm, *a: sequence_rewards(models.reward, rm, *a)),
                                  frozen[1])
        evaluator = RolloutEval(policy=models.policy, reference=models.reference,
                                ref_params=frozen[0], tokenizer=tokenizer, prompts=ev_prompts,
                                rows=ev_rows, sampling=sampling, reward_fns=eval_rewards or {},
                                device_rewards=rm_fn, seed=cfg.seed)
        eval_fn = lambda s: evaluator(s.params["policy"])  # noqa: E731
    state, history = train_loop(cfg.loop, run_dir=run_dir, state=state, step_fn=step_fn,
                                data=data, eval_fn=eval_fn, postfix=("score", "kl"),
                                tokens_in=None)
    result = finish_run(run_dir, models.policy.config, state.params["policy"], tokenizer, state,
                        total_steps=cfg.loop.total_steps,
                        kl_coef=float(np.asarray(state.algo.kl_coef)))
    return result | {"state": state, "models": models, "evaluator": evaluator}
