"""The one on-policy engine: rollout -> score -> rewards -> advantages -> epochs x minibatches.

Every RL-style stage (PPO, the GRPO family, and whatever comes next) is an
``OnPolicyAlgorithm`` (declared with ``Models`` and ``Rewards`` in ``train.onpolicy_spec``): a
few pure functions saying what differs between algorithms

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
``prompts x group_size`` rows are split over ``data x fsdp``. The rollout may run on a mesh of
its own devices (``rollout_mesh``), and one step ahead of the update (``max_staleness=1``,
one-step-off with truncated importance weights: ``train.overlap``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import Tokenizer, decode_completions
from rlhf_jax.models import (completion_values, remat_compiler_options, score_completions,
                             sequence_rewards)
from rlhf_jax.ops import kl_k1, masked_mean
from rlhf_jax.ops.stats import Mean
from rlhf_jax.parallel import (batch_sharding, fetch, from_main, param_shardings, put,
                               replicated)
from rlhf_jax.rewards import call_reward_fns, combine_rewards, nan_means
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train.onpolicy_spec import Forward, Models, OnPolicyAlgorithm, Rewards
from rlhf_jax.train.overlap import Pending, corrected_advantages, correct_rollout, placeholder
from rlhf_jax.train.state import TrainState, create_train_state, state_shardings, step_key
from rlhf_jax.train.step import minibatch_updates
from rlhf_jax.types import Rollout


def _rollout_fn(algo: OnPolicyAlgorithm, models: Models, sampling: SamplingConfig):
    """``rollout(params, rng, step, frozen, prompt, prompt_mask) -> (Rollout, reward-model
    scores | None, metrics)``: sample with the key of ``step`` (``fold_in(rng, step)``), then
    score with every model the algorithm needs."""
    sample = make_sampler(models.policy, sampling)
    temp = sampling.temperature or 1.0

    def rollout(params, rng, step, frozen, prompt, prompt_mask):
        policy = models.policy_params(params, frozen)  # merge-free with LoRA
        out = sample(policy, prompt, prompt_mask, jax.random.fold_in(rng, step))
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
               temperature: float, group_size: int, is_cap: float | None):
    """``update(state, frozen, rollout, host rewards | None, reward-model scores | None) ->
    (state, metrics)``. ``is_cap``: the rollout is one step old; correct it with truncated
    importance weights capped there (``train.overlap``); None: the rollout is on-policy."""
    forward = _forward_fn(algo, models, temperature)

    def loss_fn(params, frozen, mb: Rollout, _key, algo_state):
        fwd = forward(params, frozen, mb)
        extra = {}
        if not algo.score_old:  # old_logp holds the sampler's: measure the gap, then reuse
            m = mb.mask
            prox = jax.lax.stop_gradient(fwd.logprobs)  # the update's params before any step
            if is_cap is None:
                extra["logprob_diff_sampler_trainer"] = Mean(
                    jnp.sum(jnp.where(m, jnp.abs(mb.old_logp - fwd.logprobs), 0.0)),
                    jnp.sum(m, dtype=jnp.float32))
            else:  # a step-old sampler: offpolicy/logprob_diff is that gap, staleness included
                adv, acc = corrected_advantages(mb.advantages, prox, mb.old_logp,
                                                m & mb.live[:, None], cap=is_cap)
                mb, extra = mb._replace(advantages=adv), extra | acc
            mb = mb._replace(old_logp=prox)
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
        if is_cap is not None and algo.score_old:  # score the proximal policy theta_t once
            prox = score_completions(
                models.policy, models.policy_params(state.params, frozen), ro.prompt,
                ro.prompt_mask, ro.completion, ro.mask, temperature=temperature).logprobs
            ro, off_metrics = correct_rollout(ro, prox, cap=is_cap)
            metrics |= off_metrics
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


_NO_REWARDS = Rewards()  # the default: no reward functions, the reward model's weight 1


class OnPolicyEngine:
    """Compiles an algorithm's rollout and update once and runs one iteration per ``step``.

    ``step(state, (prompt_batch, row_index)[, next_batch])`` is the trainer loop's step
    function: prompts ``[N, P]`` (and their row numbers, for the reward functions' extra
    columns) in, the updated state and the iteration's metrics out.

    ``rollout_mesh``: a mesh on devices disjoint from ``mesh`` where the rollout runs (the
    params are copied there before each rollout, the rollout copied back before the update);
    None: the rollout runs on ``mesh``. ``max_staleness=1``: one-step-off (``train.overlap``):
    ``step`` also takes the next batch (``train_loop(..., lookahead=True)``), starts its rollout
    with the current params, and updates on the rollout the previous step started, corrected by
    importance weights truncated at ``is_cap``; ``init`` then needs ``prompt_shape``.
    """

    def __init__(self, algo: OnPolicyAlgorithm, models: Models, *, sampling: SamplingConfig,
                 optimizer, rewards: Rewards = _NO_REWARDS, tokenizer: Tokenizer | None = None,
                 rows: list[dict] | None = None, mesh=None, rollout_mesh=None,
                 max_staleness: int = 0, is_cap: float = 2.0):
        if rewards.functions and (tokenizer is None or rows is None):
            raise ValueError("reward functions need the tokenizer and the prompt rows")
        if max_staleness not in (0, 1):
            raise ValueError(f"max_staleness must be 0 (on-policy) or 1 (one-step-off), got "
                             f"{max_staleness}")
        if not is_cap >= 1.0:
            raise ValueError(f"is_cap must be >= 1 (a cap below 1 shrinks every token's "
                             f"weight), got {is_cap}")
        if rollout_mesh is not None and (mesh is None or jax.process_count() > 1 or set(
                rollout_mesh.devices.flat) & set(mesh.devices.flat)):
            raise ValueError("rollout_mesh needs one process and a training mesh on other "
                             "devices")
        self.algo, self.models, self.sampling = algo, models, sampling
        self.optimizer, self.rewards, self.mesh = optimizer, rewards, mesh
        self.rollout_mesh, self.max_staleness = rollout_mesh, max_staleness
        self.tokenizer, self.rows = tokenizer, rows or []
        self.columns = [k for k in (self.rows[0] if self.rows else {}) if k != "prompt"]
        self._rollout = _rollout_fn(algo, models, sampling)
        self._update = _update_fn(algo, models, rewards, optimizer, sampling.temperature or 1.0,
                                  sampling.n, is_cap if max_staleness else None)
        self.rollout_jit = self.update_jit = None
        self._produced = None  # the Pending this engine's last step made

    def _param_shardings(self, params, mesh) -> dict | None:
        if mesh is None:
            return None
        sh = {"policy": param_shardings(self.models.policy.config, params["policy"], mesh)}
        if self.models.critic is not None:
            sh["value"] = param_shardings(self.models.critic.config, params["value"], mesh)
        return sh

    def _frozen_shardings(self, frozen, mesh) -> dict | None:
        if mesh is None:
            return None
        return {k: param_shardings(self.models.frozen_config(k), v, mesh)
                for k, v in frozen.items()}

    def init(self, params: dict, frozen: dict, *, seed: int, algo_state=(),
             prompt_shape: tuple[int, int] | None = None) -> TrainState:
        """A fresh state (placed on the mesh), the frozen params placed, both steps compiled.
        ``params``: ``{"policy": ..., ["value": ...]}``; ``frozen``: ``{"reference": ...,
        "reward": ...}`` for the models that are set, and ``"base"`` with LoRA.
        ``prompt_shape``: ``(N, P)`` of a step's prompts, needed with ``max_staleness=1`` (the
        state then holds a placeholder of the pending rollout, the shape a checkpoint has)."""
        if self.max_staleness and prompt_shape is None:
            raise ValueError("max_staleness=1 needs init(..., prompt_shape=(prompts, width))")
        state = create_train_state(params, self.optimizer, seed=seed, algo=algo_state)
        mesh, rmesh = self.mesh, self.rollout_mesh or self.mesh
        self._roll_params = None  # rollout params' shardings when they must move there
        if mesh is None:
            self.frozen = self.rollout_frozen = frozen
            self.rollout_jit = jax.jit(self._rollout)
            self.update_jit = jax.jit(self._update, donate_argnums=(0,),
                                      compiler_options=remat_compiler_options())
            self._prompts = self._rows = self._roll_rep = None
            return self._with_pending(state, prompt_shape)
        st_sh = state_shardings(state, mesh, self._param_shardings(params, mesh))
        fz_sh = self._frozen_shardings(frozen, mesh)
        rep, self._rows = replicated(mesh), batch_sharding(mesh)
        self.update_jit = jax.jit(self._update, in_shardings=(st_sh, fz_sh) + (self._rows,) * 3,
                                  out_shardings=(st_sh, rep), donate_argnums=(0,),
                                  compiler_options=remat_compiler_options(
                                      mesh.devices.flat[0].platform))
        self.frozen = put(frozen, fz_sh)
        roll_p, roll_fz = st_sh.params, fz_sh
        if rmesh is not mesh:
            roll_p = self._roll_params = self._param_shardings(params, rmesh)
            roll_fz = self._frozen_shardings(frozen, rmesh)
        self.rollout_frozen = self.frozen if rmesh is mesh else put(frozen, roll_fz)
        rrep, rrows = replicated(rmesh), batch_sharding(rmesh)
        self._roll_rep = rrep
        # one sample per prompt: the prompts split like the rows; a group: prompts replicated
        # (their count need not divide the mesh), the prompts x group rows leave split
        self._prompts = rrows if self.sampling.n == 1 else rrep
        self.rollout_jit = jax.jit(self._rollout, in_shardings=(roll_p, rrep, rrep, roll_fz,
                                                                self._prompts, self._prompts),
                                   out_shardings=(rrows, rrows, rrep))
        return self._with_pending(put(state, st_sh), prompt_shape)

    def _with_pending(self, state: TrainState, prompt_shape) -> TrainState:
        """With ``max_staleness=1``: ``state`` holding a zero ``Pending`` (index -1) shaped and
        placed like the real one."""
        if not self.max_staleness:
            return state
        n, width = prompt_shape
        tok = jax.ShapeDtypeStruct((n, width), jnp.int32)
        shapes = jax.eval_shape(self._rollout, state.params, state.rng, state.step,
                                self.rollout_frozen, tok, tok.update(dtype=jnp.bool_))
        pending = Pending(*placeholder(shapes), np.full((n,), -1, np.int32))
        return state._replace(pending=self._on_training_mesh(pending))

    def _on_training_mesh(self, pending: Pending) -> Pending:
        """``pending`` placed like the training rows (a checkpoint holds one mesh's arrays)."""
        if self.mesh is None:
            return pending
        rows, rep = self._rows, replicated(self.mesh)
        return Pending(*(put(x, sh) for x, sh in zip(pending, (rows, rows, rep, rep))))

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

    def sample(self, state: TrainState, step, prompts) -> tuple[Rollout, Any, dict]:
        """Dispatch the rollout of ``prompts`` with ``state``'s params and the key of ``step``
        (on the rollout mesh, the params copied there first)."""
        tokens, mask = self._place((prompts.tokens, prompts.mask), self._prompts)
        params, rng = state.params, state.rng
        if self._roll_params is not None:
            params, rng, step = put(params, self._roll_params), *put((rng, step), self._roll_rep)
        return self.rollout_jit(params, rng, step, self.rollout_frozen, tokens, mask)

    def update(self, state: TrainState, ro: Rollout, rm, index) -> tuple[TrainState, dict]:
        """Train on a rollout of the prompt rows ``index``: host rewards, the rollout moved to
        the training mesh, the update (state donated)."""
        host, means = self.host_rewards(ro, index)
        if self._roll_params is not None:
            ro, rm = put((ro, rm), self._rows)
        state, up = self.update_jit(state, self.frozen, ro, host, rm)
        return state, up | means

    def step(self, state: TrainState, batch, next_batch=None) -> tuple[TrainState, dict]:
        """One iteration: rollout, host rewards (if any), update; one-step-off (see the class
        docstring) with ``max_staleness=1``."""
        if self.max_staleness:
            return self._step_one_off(state, batch, next_batch)
        prompts, index = batch
        ro, rm, metrics = self.sample(state, state.step, prompts)
        state, up = self.update(state, ro, rm, index)
        return state, metrics | up

    def _step_one_off(self, state: TrainState, batch, next_batch):
        if next_batch is None:
            raise ValueError("max_staleness=1: step(state, batch, next_batch) needs the next "
                             "batch (train_loop(..., lookahead=True))")
        pending = state.pending
        if pending is not self._produced:  # a fresh or restored state: check it first
            pending = self._first_pending(state, batch)
        prompts, index = next_batch
        # dispatched before the update, which then runs while this rollout samples
        nxt = Pending(*self.sample(state, state.step + 1, prompts), np.asarray(index, np.int32))
        state, up = self.update(state._replace(pending=()), pending.rollout, pending.rm,
                                batch[1])
        nxt = self._produced = self._on_training_mesh(nxt)  # copied once sampled
        return state._replace(pending=nxt), pending.metrics | up

    def _first_pending(self, state: TrainState, batch) -> Pending:
        """The pending rollout of a state this engine did not just make: a fresh state's (step
        0: the batch is sampled now, with ``theta_0``) or a restored one's (checked to be this
        batch's)."""
        prompts, index = batch
        held = np.asarray(fetch(state.pending.index))
        if np.all(held == -1):
            step = int(fetch(state.step))
            if step != 0:
                raise ValueError(f"the state at step {step} holds no pending rollout; a "
                                 f"one-step-off run resumes only from its own checkpoints")
            ro, rm, metrics = self.sample(state, state.step, prompts)
            return Pending(ro, rm, metrics, held)
        if not np.array_equal(held, np.asarray(index)):
            raise ValueError(f"the pending rollout was sampled for prompt rows {held.tolist()} "
                             f"but this step's batch is rows {np.asarray(index).tolist()}: the "
                             f"data order differs from the run that saved the state")
        return state.pending


__all__ = ["Forward", "Models", "OnPolicyAlgorithm", "OnPolicyEngine", "Rewards"]
