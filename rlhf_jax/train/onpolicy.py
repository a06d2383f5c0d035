"""The one on-policy engine: rollout -> score -> rewards -> advantages -> epochs x minibatches.

Every RL-style stage (PPO, the GRPO family, and whatever comes next) is an
``OnPolicyAlgorithm``: a few pure functions saying what differs between algorithms

* ``advantages(rollout, algo_state)``: how rewards become advantages (GAE with a critic, group
  baselines, ...) and which rows count (dynamic sampling);
* ``loss(forward, minibatch, algo_state)``: the clipped objective on the updated policy's
  ``Forward`` (log-probs, and entropy / values when asked for);
* ``next_algo_state(algo_state, kl, batch)``: e.g. the adaptive KL controller;
* flags for which models are scored.

The engine owns the rest, the same for every algorithm:

1. ``rollout`` (one compiled program): sample ``group_size`` completions per prompt with the
   KV-cached sampler, then score them: the policy (unless one update per rollout lets the update's
   own forward pass stand in), the frozen reference, the critic and the reward model.
2. Reward functions on the host (only when the stage has any): decoded text in, floats out.
3. ``update`` (one compiled program, state donated): the scalar reward
   ``sum_f w_f f + w_RM RM - penalty [no EOS]``, the per-sequence KL, the algorithm's advantages,
   ``epochs x num_minibatches`` guarded optimizer updates in one ``lax.scan``
   (``train.minibatch_updates``), then the algorithm state.

Nothing in a step waits on the host unless reward functions need the text. With a mesh, the
trained params and the frozen models are placed by their families' sharding rules and the
``prompts x group_size`` rows are split over ``data x fsdp``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import Tokenizer, decode_completions
from rlhf_jax.models import (Model, combine, completion_values, remat_compiler_options,
                             score_completions, sequence_rewards)
from rlhf_jax.ops import kl_k1, masked_mean
from rlhf_jax.ops.stats import Mean
from rlhf_jax.parallel import (batch_sharding, fetch, from_main, param_shardings, put,
                               replicated)
from rlhf_jax.rewards import RewardFn, call_reward_fns, combine_rewards, nan_means
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train.state import TrainState, create_train_state, state_shardings, step_key
from rlhf_jax.train.step import minibatch_updates
from rlhf_jax.types import Rollout


class Forward(NamedTuple):
    """The updated policy on a minibatch: per completion token, 0 where masked."""

    logprobs: jax.Array
    entropy: jax.Array | None
    values: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Models:
    """The models of an on-policy run. ``policy`` (and ``critic``) train; the others are frozen
    and their params live in the engine's ``frozen`` dict under the same names."""

    policy: Model
    reference: Model | None = None
    """Scored for the KL leash; None: no reference pass at all."""
    reward: Model | None = None
    """Reward model scored on device."""
    critic: Model | None = None
    """A separate value model (params ``"value"``); None with ``shared_values`` or no critic."""
    shared_values: bool = False
    """The value head sits on the policy."""
    lora: bool = False
    """The policy is a LoRA model (``train.adapters``): its trained params are the adapter (and
    any head), its full params ``combine(frozen["base"], params["policy"])``."""
    reference_of_base: Callable[[Any], Any] | None = None
    """With ``lora``: the reference is the base with the adapter off, its params this function
    of ``frozen["base"]`` (``Adapted.reference``); no second copy of the weights exists."""
    critic_lora: bool = False
    """The critic is a LoRA adapter plus a value head on ``frozen["value_base"]``."""
    critic_on_policy_base: tuple[str, ...] | None = None
    """With ``critic_lora``: the critic's base is ``frozen["base"]`` itself, these top-level
    entries of it (a second adapter on the policy's base; no second copy)."""

    def configs(self) -> dict:
        return {k: m.config for k, m in vars(self).items() if isinstance(m, Model)}

    def policy_params(self, params, frozen):
        """The policy's full params from the trained ones (and the frozen base with LoRA)."""
        return combine(frozen["base"], params["policy"]) if self.lora else params["policy"]

    def critic_params(self, params, frozen):
        """The separate critic's full params (its adapter on its frozen base with LoRA)."""
        if not self.critic_lora:
            return params["value"]
        if self.critic_on_policy_base is not None:
            base = {k: frozen["base"][k] for k in self.critic_on_policy_base}
            return combine(base, params["value"])
        return combine(frozen["value_base"], params["value"])

    def reference_params(self, frozen):
        """The reference's params: its own, or the adapter-off base."""
        if self.reference_of_base is not None:
            return self.reference_of_base(frozen["base"])
        return frozen["reference"]

    def frozen_config(self, name: str):
        """The model config a frozen entry belongs to (``base``: the policy's, ``value_base``:
        the critic's)."""
        owner = {"base": self.policy, "value_base": self.critic}.get(name)
        return (owner if owner is not None else getattr(self, name)).config


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnPolicyAlgorithm:
    """What one on-policy algorithm defines (see the module docstring)."""

    advantages: Callable[[Rollout, Any], tuple[Rollout, dict]]
    """``(rollout with rewards, algo_state) -> (rollout with advantages [returns, live],
    metrics)``."""
    loss: Callable[[Forward, Rollout, Any], tuple]
    """``(forward, minibatch, algo_state) -> (loss_sum, count, metric accumulators)``; the
    minibatch's ``mask`` already excludes rows that are not ``live``."""
    epochs: int = 1
    """Passes over each rollout."""
    num_minibatches: int = 1
    """Optimizer updates per pass."""
    score_old: bool = True
    """Score the policy after sampling for the ratio's denominator. False (one update per
    rollout only): the update's own log-probs stand in (ratio 1), one forward pass fewer."""
    rollout_entropy: bool = False
    """Log the sampling policy's entropy (needs ``score_old``)."""
    loss_entropy: bool = False
    """The loss reads the updated policy's entropy (a second pass over the vocabulary)."""
    next_algo_state: Callable[[Any, jax.Array, int], Any] | None = None
    """``(algo_state, mean per-sequence KL, rollout rows) -> algo_state`` after the updates."""

    def __post_init__(self):
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError("epochs and num_minibatches must be >= 1")
        if not self.score_old and (self.epochs, self.num_minibatches) != (1, 1):
            raise ValueError("score_old=False needs one update per rollout")
        if self.rollout_entropy and not self.score_old:
            raise ValueError("rollout_entropy needs score_old (the entropy comes from that pass)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rewards:
    """How the scalar reward of a completion is made (``pipelines.RewardConfig``, resolved)."""

    functions: Mapping[str, RewardFn] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    model_weight: float = 1.0
    missing_eos_penalty: float = 0.0
    non_finite: str = "error"
    """A non-finite or missing reward: ``error``, or ``drop`` the completion (and its group)
    from the loss (``rewards.combine_rewards``)."""
    time_limit: float | None = None
    """Seconds per reward-function call (None: no limit)."""


def _rollout_fn(algo: OnPolicyAlgorithm, models: Models, sampling: SamplingConfig):
    """``rollout(state, frozen, prompt, prompt_mask) -> (Rollout, reward-model scores | None,
    metrics)``: sample, then score with every model the algorithm needs."""
    sample = make_sampler(models.policy, sampling)
    temp = sampling.temperature or 1.0

    def rollout(state: TrainState, frozen, prompt, prompt_mask):
        params = state.params
        policy = models.policy_params(params, frozen)  # merge-free with LoRA
        out = sample(policy, prompt, prompt_mask, step_key(state))
        args = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
        old, entropy, values, metrics = out.logprobs, None, None, {}
        if algo.score_old:
            pol = score_completions(models.policy, policy, *args, temperature=temp,
                                    entropy=algo.rollout_entropy, values=models.shared_values)
            old, entropy, values = pol.logprobs, pol.entropy, pol.values
            metrics["logprob_diff_sampler_trainer"] = masked_mean(
                jnp.abs(out.logprobs - old), out.mask)
        ref = (None if models.reference is None else score_completions(
            models.reference, models.reference_params(frozen), *args,
            temperature=temp).logprobs)
        if models.critic is not None:
            values = completion_values(models.critic, models.critic_params(params, frozen), *args)
        rm = (None if models.reward is None
              else sequence_rewards(models.reward, frozen["reward"], *args))
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, out.mask)
        ro = Rollout(out.prompt_tokens, out.prompt_mask, out.tokens, out.mask, out.truncated,
                     out.logprobs, old, ref_logp=ref, values=values, entropy=entropy)
        return ro, rm, metrics

    return rollout


def _forward_fn(algo: OnPolicyAlgorithm, models: Models, temperature: float):
    def forward(params, frozen, mb: Rollout) -> Forward:
        args = (mb.prompt, mb.prompt_mask, mb.completion, mb.mask)
        sc = score_completions(models.policy, models.policy_params(params, frozen), *args,
                               temperature=temperature, entropy=algo.loss_entropy,
                               values=models.shared_values)
        values = sc.values
        if models.critic is not None:
            values = completion_values(models.critic, models.critic_params(params, frozen), *args)
        return Forward(sc.logprobs, sc.entropy, values)

    return forward


def _reward(ro: Rollout, host, rm, rewards: Rewards):
    """The scalar reward ``[B]`` and its metrics (a NaN host reward, ``non_finite="drop"``,
    counts 0 here; the update leaves that completion out of the loss)."""
    total = jnp.zeros(ro.truncated.shape, jnp.float32) if host is None else jnp.where(
        jnp.isfinite(host), host, 0.0)
    metrics = {}
    if rm is not None:
        total = total + rewards.model_weight * rm
        metrics["rewards/reward_model"] = jnp.mean(rm)
    total = total - rewards.missing_eos_penalty * ro.truncated.astype(jnp.float32)
    return total, metrics | {"reward": jnp.mean(total), "reward_std": jnp.std(total)}


def _update_fn(algo: OnPolicyAlgorithm, models: Models, rewards: Rewards, optimizer,
               temperature: float, group_size: int):
    """``update(state, frozen, rollout, host rewards | None, reward-model scores | None) ->
    (state, metrics)``."""
    forward = _forward_fn(algo, models, temperature)

    def loss_fn(params, frozen, mb: Rollout, _key, algo_state):
        fwd = forward(params, frozen, mb)
        extra = {}
        if not algo.score_old:  # old_logp holds the sampler's: measure the gap, then reuse
            m = mb.mask
            extra["logprob_diff_sampler_trainer"] = Mean(
                jnp.sum(jnp.where(m, jnp.abs(mb.old_logp - fwd.logprobs), 0.0)),
                jnp.sum(m, dtype=jnp.float32))
            mb = mb._replace(old_logp=jax.lax.stop_gradient(fwd.logprobs))
        mb = mb._replace(mask=mb.mask & mb.live[:, None])
        total, count, metrics = algo.loss(fwd, mb, algo_state)
        return total, count, metrics | extra

    def update(state: TrainState, frozen, ro: Rollout, host, rm):
        reward, metrics = _reward(ro, host, rm, rewards)
        ro = ro._replace(rewards=reward)
        seq_kl = jnp.zeros(reward.shape, jnp.float32)
        if ro.ref_logp is not None:
            seq_kl = jnp.sum(jnp.where(ro.mask, kl_k1(ro.old_logp, ro.ref_logp), 0.0), -1)
            metrics["kl"] = jnp.mean(seq_kl)
        ok = jnp.ones(reward.shape, bool)
        if host is not None:  # non_finite="drop": those completions, and their groups, leave
            ok = jnp.repeat(jnp.all(jnp.isfinite(host).reshape(-1, group_size), 1), group_size)
            metrics["rewards_dropped_frac"] = 1.0 - jnp.mean(ok.astype(jnp.float32))
            ro = ro._replace(mask=ro.mask & ok[:, None])  # out of GAE and whitening too
        ro, adv_metrics = algo.advantages(ro, state.algo)
        ro = ro._replace(live=ok if ro.live is None else ro.live & ok)
        # the scan gathers only what a loss reads: the sampler's log-probs already sit in
        # old_logp when the policy is not scored again, and rewards are in the advantages
        params, opt_state, bad, up = minibatch_updates(
            lambda p, mb, k: loss_fn(p, frozen, mb, k, state.algo), optimizer, state.params,
            state.opt_state, ro._replace(entropy=None, sampler_logp=None, rewards=None),
            jax.random.fold_in(step_key(state), 1), epochs=algo.epochs,
            num_minibatches=algo.num_minibatches)
        algo_state = state.algo
        if algo.next_algo_state is not None:
            algo_state = algo.next_algo_state(state.algo, jnp.mean(seq_kl), reward.shape[0])
        fm = ro.mask.astype(jnp.float32)
        metrics |= adv_metrics | up | {
            "response_length": jnp.mean(jnp.sum(fm, -1)),
            "truncated_frac": jnp.mean(ro.truncated.astype(jnp.float32)),
            "kept_frac": jnp.mean(ro.live.astype(jnp.float32)),
            "update_skipped": bad.astype(jnp.float32)}
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                             algo=algo_state,
                             skipped=jnp.where(bad > 0, state.skipped + 1, 0).astype(jnp.int32))
        return new, metrics

    return update


class OnPolicyEngine:
    """Compiles an algorithm's rollout and update once and runs one iteration per ``step``.

    ``step(state, (prompt_batch, row_index))`` is the trainer loop's step function: prompts
    ``[N, P]`` (and their row numbers, for the reward functions' extra columns) in, the updated
    state and the iteration's metrics out.
    """

    def __init__(self, algo: OnPolicyAlgorithm, models: Models, *, sampling: SamplingConfig,
                 optimizer, rewards: Rewards = Rewards(), tokenizer: Tokenizer | None = None,
                 rows: list[dict] | None = None, mesh=None):
        if rewards.functions and (tokenizer is None or rows is None):
            raise ValueError("reward functions need the tokenizer and the prompt rows")
        self.algo, self.models, self.sampling = algo, models, sampling
        self.optimizer, self.rewards, self.mesh = optimizer, rewards, mesh
        self.tokenizer, self.rows = tokenizer, rows or []
        self.columns = [k for k in (self.rows[0] if self.rows else {}) if k != "prompt"]
        self._rollout = _rollout_fn(algo, models, sampling)
        self._update = _update_fn(algo, models, rewards, optimizer, sampling.temperature or 1.0,
                                  sampling.n)
        self.rollout_jit = self.update_jit = None

    def _param_shardings(self, params) -> dict | None:
        if self.mesh is None:
            return None
        sh = {"policy": param_shardings(self.models.policy.config, params["policy"], self.mesh)}
        if self.models.critic is not None:
            sh["value"] = param_shardings(self.models.critic.config, params["value"], self.mesh)
        return sh

    def _frozen_shardings(self, frozen) -> dict | None:
        if self.mesh is None:
            return None
        return {k: param_shardings(self.models.frozen_config(k), v, self.mesh)
                for k, v in frozen.items()}

    def init(self, params: dict, frozen: dict, *, seed: int, algo_state=()) -> TrainState:
        """A fresh state (placed on the mesh), the frozen params placed, both steps compiled.
        ``params``: ``{"policy": ..., ["value": ...]}``; ``frozen``: ``{"reference": ...,
        "reward": ...}`` for the models that are set, and ``"base"`` with LoRA."""
        state = create_train_state(params, self.optimizer, seed=seed, algo=algo_state)
        mesh = self.mesh
        if mesh is None:
            self.frozen = frozen
            self.rollout_jit = jax.jit(self._rollout)
            self.update_jit = jax.jit(self._update, donate_argnums=(0,),
                                      compiler_options=remat_compiler_options())
            self._prompts, self._rows = None, None
            return state
        st_sh = state_shardings(state, mesh, self._param_shardings(params))
        fz_sh = self._frozen_shardings(frozen)
        rep, rows = replicated(mesh), batch_sharding(mesh)
        # one sample per prompt: the prompts split like the rows; a group: prompts replicated
        # (their count need not divide the mesh), the prompts x group rows leave split
        self._prompts = rows if self.sampling.n == 1 else rep
        self._rows = rows
        self.rollout_jit = jax.jit(self._rollout, in_shardings=(st_sh, fz_sh, self._prompts,
                                                                self._prompts),
                                   out_shardings=(rows, rows, rep))
        self.update_jit = jax.jit(self._update, in_shardings=(st_sh, fz_sh, rows, rows, rows),
                                  out_shardings=(st_sh, rep), donate_argnums=(0,),
                                  compiler_options=remat_compiler_options(
                                      mesh.devices.flat[0].platform))
        self.frozen = put(frozen, fz_sh)
        return put(state, st_sh)

    def _place(self, tree, sharding):
        return tree if sharding is None else put(tree, sharding)

    def host_rewards(self, ro: Rollout, index) -> tuple[Any, dict]:
        """The reward functions' weighted sum ``[B]`` (placed like the rows) and their means;
        ``(None, {})`` without reward functions (nothing leaves the device)."""
        fns, rw = self.rewards.functions, self.rewards
        if not fns:
            return None, {}
        texts = decode_completions(self.tokenizer, *fetch((ro.completion, ro.mask)))
        rep = np.repeat(np.asarray(index), self.sampling.n)
        cols = {c: [self.rows[i].get(c) for i in rep] for c in self.columns}
        prompts = [self.rows[i]["prompt"] for i in rep]
        scores = call_reward_fns(fns, prompts, texts, cols, time_limit=rw.time_limit)
        total = combine_rewards(scores, rw.weights, prompts, non_finite=rw.non_finite,
                                has_model=self.models.reward is not None)
        # reward functions run on every process; process 0's values are the ones trained on
        total = from_main(np.asarray(total, np.float32))
        means = {f"rewards/{k}": v for k, v in nan_means(scores).items()}
        means["reward_timeouts"] = float(sum(scores.timeouts.values()))
        return self._place(total, self._rows), means

    def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """One iteration: rollout, host rewards (if any), update."""
        prompts, index = batch
        tokens, mask = self._place((prompts.tokens, prompts.mask), self._prompts)
        ro, rm, metrics = self.rollout_jit(state, self.frozen, tokens, mask)
        host, means = self.host_rewards(ro, index)
        state, up = self.update_jit(state, self.frozen, ro, host, rm)
        return state, metrics | up | means


__all__ = ["Forward", "Models", "OnPolicyAlgorithm", "OnPolicyEngine", "Rewards"]
