"""The step factory: ``step(state, batch) -> (state, metrics)``, jitted once per shape.

A loss function for the trainer has the signature ``loss_fn(params, batch, key) ->
(loss_sum, count, metrics)`` (the pure losses' contract). The step

1. splits the batch into ``micro_batches`` along its leading axis and, in a ``lax.scan``, adds the
   micro-batches' loss sums, counts, metric accumulators and *gradients of the sums*;
2. divides once: ``grad = sum_i grad(loss_sum_i) / sum_i count_i``, which is exactly the gradient of
   the whole batch's mean (gradient accumulation with no loss-scale drift);
3. skips the update when the gradient or loss is non-finite: params and optimizer state come out
   bitwise unchanged, ``skipped`` counts consecutive skips (the loop stops after too many);
4. returns scalar metrics (``loss``, ``grad_norm``, ``learning_rate``, ``count``,
   ``update_skipped`` plus the loss's own) computed on device.

With a ``mesh`` the batch is sharded over its ``data`` (and ``fsdp``) axes and the state is
placed by ``state_shardings`` (replicated when not given; FSDP/tensor-parallel when built from
``parallel.param_shardings``): the same program then runs data-parallel, fully sharded or tensor
parallel, and XLA inserts the collectives. The state buffers are donated so XLA updates them in
place.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.models.transformer import remat_compiler_options
from rlhf_jax.ops.aggregation import safe_divide
from rlhf_jax.ops.stats import Max, Mean, Min, compute_metrics, merge_metrics
from rlhf_jax.parallel.placement import batch_sharding, put, replicated
from rlhf_jax.train.state import TrainState, step_key

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, jax.Array, dict]]


def _split(batch, k: int):
    def f(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={k}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])

    return jax.tree.map(f, batch)


def accumulate(loss_fn: LossFn, params, batch, key, micro_batches: int):
    """Sum of loss sums, counts, gradients and merged metrics over ``micro_batches`` slices."""
    grad_fn = jax.grad(lambda p, b, k: (lambda o: (o[0], o))(loss_fn(p, b, k)), has_aux=True)
    parts = _split(batch, micro_batches)
    first = jax.tree.map(lambda x: x[0], parts)
    grads, (total, count, metrics) = grad_fn(params, first, jax.random.fold_in(key, 0))
    if micro_batches == 1:
        return grads, total, count, metrics

    def body(carry, xs):
        g_acc, t_acc, c_acc, m_acc = carry
        i, mb = xs
        g, (t, c, m) = grad_fn(params, mb, jax.random.fold_in(key, i))
        return (jax.tree.map(jnp.add, g_acc, g), t_acc + t, c_acc + c,
                merge_metrics(m_acc, m)), None

    rest = jax.tree.map(lambda x: x[1:], parts)
    idx = jnp.arange(1, micro_batches)
    (grads, total, count, metrics), _ = jax.lax.scan(body, (grads, total, count, metrics),
                                                     (idx, rest))
    return grads, total, count, metrics


def merge_stacked_metrics(metrics: dict) -> dict:
    """Merge metric accumulators stacked along a leading axis (the output of a ``lax.scan`` over
    minibatches) into one each: ``Mean`` sums, ``Max`` and ``Min`` reduce, and any other
    accumulator (``ExplainedVariance``'s moments) folds its own ``merge`` over the axis in a
    ``lax.scan``. Computing after this gives exact whole-update figures, not a mean of means."""
    def merge(acc):
        if isinstance(acc, Mean):
            return Mean(*(jnp.sum(f, axis=0) for f in acc))
        if isinstance(acc, Max):
            return Max(jnp.max(acc.value, axis=0))
        if isinstance(acc, Min):
            return Min(jnp.min(acc.value, axis=0))
        first, rest = jax.tree.map(lambda x: x[0], acc), jax.tree.map(lambda x: x[1:], acc)
        return jax.lax.scan(lambda a, b: (a.merge(b), None), first, rest)[0]

    return {k: merge(v) for k, v in metrics.items()}


def guarded_update(optimizer: optax.GradientTransformation, params, opt_state, grad_sums,
                   loss_sum, count):
    """Divide summed gradients by ``count`` once and apply them, unless anything is non-finite.

    Returns ``(params, opt_state, loss, grad_norm, ok)``; when ``ok`` is False the params and
    optimizer state come back bitwise unchanged (the update is skipped, not zeroed).
    """
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grad_sums)
    loss = safe_divide(loss_sum, count)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    safe_grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, new_opt = optimizer.update(safe_grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa
    return keep(new_params, params), keep(new_opt, opt_state), loss, grad_norm, ok


def minibatch_updates(loss_fn: LossFn, optimizer: optax.GradientTransformation, params,
                      opt_state, batch, key, *, epochs: int, num_minibatches: int):
    """``epochs`` shuffled passes over ``batch``, one guarded optimizer update per minibatch, in
    one ``lax.scan`` (PPO's epochs, GRPO's iterations).

    Epoch ``e`` uses the permutation ``permutation(fold_in(key, e), B)`` split into
    ``num_minibatches`` slices. Returns ``(params, opt_state, skipped, metrics)``: ``skipped``
    counts minibatch updates dropped as non-finite; ``metrics`` are the loss's accumulators merged
    over every minibatch (exact), plus the mean minibatch ``loss`` and ``grad_norm``.
    """
    batch = jax.tree.map(jnp.asarray, batch)  # host arrays cannot be indexed by a traced index
    b = jax.tree.leaves(batch)[0].shape[0]
    if b % num_minibatches:
        raise ValueError(f"batch {b} is not divisible by num_minibatches={num_minibatches}")

    def one(carry, xs):
        params, opt_state, bad = carry
        idx, mkey = xs
        mb = jax.tree.map(lambda x: x[idx], batch)
        grads, total, count, metrics = accumulate(loss_fn, params, mb, mkey, 1)
        params, opt_state, loss, gnorm, ok = guarded_update(optimizer, params, opt_state,
                                                            grads, total, count)
        return (params, opt_state, bad + (~ok).astype(jnp.int32)), (metrics, loss, gnorm)

    idx = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), b)
                           .reshape(num_minibatches, b // num_minibatches)
                           for e in range(epochs)])
    (params, opt_state, bad), (accs, losses, gnorms) = jax.lax.scan(
        one, (params, opt_state, jnp.int32(0)), (idx, jax.random.split(key, idx.shape[0])))
    metrics = compute_metrics(merge_stacked_metrics(accs))
    metrics |= {"loss": jnp.mean(losses), "grad_norm": jnp.mean(gnorms)}
    return params, opt_state, bad, metrics


def _frozen_sharding(mesh, frozen, frozen_shardings):
    if frozen is None:
        return ()
    return (replicated(mesh) if frozen_shardings is None else frozen_shardings,)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    micro_batches: int = 1, mesh=None, state_shardings=None,
                    learning_rate: optax.Schedule | None = None, frozen=None,
                    frozen_shardings=None):
    """Build the jitted training step (see the module docstring).

    ``frozen``: a pytree of arrays the loss needs but never trains (a distillation teacher, a
    reference model). It is passed to the compiled step as an argument, not captured as a
    constant, and ``loss_fn`` is then called as ``loss_fn(params, batch, key, frozen)``.
    ``state_shardings`` / ``frozen_shardings`` (with ``mesh``): where the state and the frozen
    arrays live (``train.state_shardings``, ``parallel.param_shardings``); replicated when None.
    The returned step places each host batch itself (``parallel.put``: multi-process safe).
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")

    def step(state: TrainState, batch, frozen_args=None) -> tuple[TrainState, dict]:
        fn = loss_fn if frozen is None else (
            lambda p, b, k: loss_fn(p, b, k, frozen_args))
        grads, total, count, metrics = accumulate(fn, state.params, batch,
                                                  step_key(state), micro_batches)
        params, opt_state, loss, grad_norm, ok = guarded_update(
            optimizer, state.params, state.opt_state, grads, total, count)
        new_state = state._replace(
            step=state.step + 1, params=params, opt_state=opt_state,
            skipped=jnp.where(ok, 0, state.skipped + 1).astype(jnp.int32))
        out = {k: v for k, v in compute_metrics(metrics).items()}
        out |= {"loss": loss, "grad_norm": grad_norm, "count": count,
                "update_skipped": (~ok).astype(jnp.float32)}
        if learning_rate is not None:
            out["learning_rate"] = learning_rate(state.step)
        return new_state, out

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(0,), compiler_options=remat_compiler_options())
        if frozen is None:
            return jitted
        return lambda state, batch: jitted(state, batch, frozen)
    rep, rows = replicated(mesh), batch_sharding(mesh)
    st = rep if state_shardings is None else state_shardings
    fz = _frozen_sharding(mesh, frozen, frozen_shardings)
    jitted = jax.jit(step, in_shardings=(st, rows) + fz, out_shardings=(st, rep),
                     donate_argnums=(0,),
                     compiler_options=remat_compiler_options(mesh.devices.flat[0].platform))
    frozen_args = () if frozen is None else (put(frozen, fz[0]),)
    return lambda state, batch: jitted(state, put(batch, rows), *frozen_args)


def make_eval_step(loss_fn: LossFn, *, mesh=None, frozen=None, param_shardings=None,
                   frozen_shardings=None):
    """Jitted ``evaluate(params, batch, key) -> (loss_sum, count, metric accumulators)``.

    The loop merges these over the eval set and divides once, so eval figures are exact means.
    ``frozen`` and the shardings as in ``make_train_step`` (``param_shardings``: the params').
    """
    def evaluate(params, batch, key, frozen_args=None):
        if frozen is None:
            return loss_fn(params, batch, key)
        return loss_fn(params, batch, key, frozen_args)

    if mesh is None:
        jitted = jax.jit(evaluate)
        if frozen is None:
            return jitted
        return lambda params, batch, key: jitted(params, batch, key, frozen)
    rep, rows = replicated(mesh), batch_sharding(mesh)
    ps = rep if param_shardings is None else param_shardings
    fz = _frozen_sharding(mesh, frozen, frozen_shardings)
    jitted = jax.jit(evaluate, in_shardings=(ps, rows, rep) + fz, out_shardings=rep)
    frozen_args = () if frozen is None else (put(frozen, fz[0]),)
    return lambda params, batch, key: jitted(params, put(batch, rows), put(key, rep),
                                             *frozen_args)
