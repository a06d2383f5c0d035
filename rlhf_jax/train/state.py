"""The trainer's state: one pytree holding everything a resumed run needs.

``rng`` is the run's *base* key and never changes: the key of step ``t`` is
``fold_in(rng, t)`` (``step_key``), so resuming at step ``t`` reproduces step ``t``'s randomness
by construction, and no key is carried forward from step to step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(NamedTuple):
    """``step``: updates applied; ``params``; ``opt_state``; ``rng``: base key; ``algo``:
    algorithm state such as ``ops.KLControllerState`` (any pytree, ``()`` when none);
    ``skipped``: consecutive non-finite-gradient steps that were not applied; ``pending``: what
    a step hands to the next one and a resume needs (the one-step-off engine's rollout of the
    next batch, ``train.onpolicy``; ``()`` otherwise)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    algo: Any = ()
    skipped: jax.Array = np.zeros((), np.int32)  # host default: importing touches no device
    pending: Any = ()


def create_train_state(params, optimizer: optax.GradientTransformation, *, seed: int,
                       algo: Any = ()) -> TrainState:
    """Fresh state at step 0 with ``optimizer.init(params)`` and base key ``PRNGKey(seed)``."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed),
                      algo=algo, skipped=jnp.zeros((), jnp.int32))


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the current step: ``fold_in(base_key, step)``."""
    return jax.random.fold_in(state.rng, state.step)


def state_shardings(state: TrainState, mesh, param_shardings=None) -> TrainState:
    """A ``TrainState`` of shardings: params as ``param_shardings`` (a tree of
    ``NamedSharding``, e.g. ``parallel.param_shardings``; default replicated), optimizer moments
    following the params (``parallel.opt_state_shardings``), everything else replicated."""
    from rlhf_jax.parallel import opt_state_shardings, replicated

    rep = replicated(mesh)
    if param_shardings is None:
        return jax.tree.map(lambda _: rep, state)
    return TrainState(
        step=rep, params=param_shardings,
        opt_state=opt_state_shardings(state.opt_state, param_shardings, mesh,
                                      params=state.params),
        rng=rep, algo=jax.tree.map(lambda _: rep, state.algo), skipped=rep,
        pending=jax.tree.map(lambda _: rep, state.pending))  # the engine places its rows
