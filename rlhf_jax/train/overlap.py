r"""One-step-off rollouts for the on-policy engine (``OnPolicyEngine(max_staleness=1)``).

Step ``t`` dispatches the rollout of the *next* batch with the current params ``theta_t`` and
then runs update ``t`` on the rollout the previous step dispatched (sampled by
``theta_{t-1}``). JAX dispatch is asynchronous, so the sampling of step ``t + 1`` runs while
the host scores step ``t``'s completions and the devices run its update: on disjoint device
sets (a rollout sub-mesh) the two programs run at the same time; on one device set only the
host work (reward functions, decoding) overlaps. Step 0 samples its own batch first with
``theta_0`` (nothing is pending yet), so every step trains on exactly one batch, the one the
loop's ledger records for it.

The update corrects for the stale sampler with decoupled PPO and a truncated importance
weight (``ops.truncated_importance_weights``): the proximal policy ``pi_prox = pi_{theta_t}``
is scored at the start of the update (with ``score_old=False``, one update per rollout, the
update's own forward pass *is* that score and costs nothing; otherwise it is one more forward
pass), the clipped ratio is ``pi_theta / pi_prox``, and each token's advantage is multiplied
by ``w_t = min(pi_prox / pi_behav, C)``. Since ``w_t >= 0``,
``w max(-A u, -A clip(u)) = max(-(w A) u, -(w A) clip(u))``: folding the weight into the
advantage is exactly the decoupled objective, and every algorithm's loss is used
unchanged (it then receives ``[B, T]`` advantages). The KL leash and a critic's values still
come from the behaviour policy's pass (their estimates are one step old).

The pending rollout is part of ``TrainState`` (``pending``), so a checkpoint holds it and a
resumed run trains on the very completions the uninterrupted run would have: resume stays
exact without sampling anything again.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops import truncated_importance_weights
from rlhf_jax.ops.stats import Mean
from rlhf_jax.types import Rollout


class Pending(NamedTuple):
    """The rollout one step-off step hands to the next (``TrainState.pending``)."""

    rollout: Rollout
    """Sampled (and scored) by the params before the update that made this state."""
    rm: Any
    """Reward-model scores ``[B]`` (None without a reward model)."""
    metrics: dict
    """The rollout's own metrics (sampler/trainer gap, entropy)."""
    index: jax.Array
    """``[N]`` row numbers of its prompts; all -1 in the placeholder of a fresh state."""


def corrected_advantages(advantages, prox_logp, behaviour_logp, mask, *,
                         cap: float) -> tuple[jax.Array, dict[str, Mean]]:
    """``(advantages * w  [B, T], metric accumulators)`` with
    ``w_t = min(exp(prox_t - behaviour_t), cap)`` (``ops.truncated_importance_weights``).

    Metrics, token means over ``mask``: ``offpolicy/logprob_diff`` ``|log pi_prox - log
    pi_behav|``, ``offpolicy/is_weight_mean`` ``w``, ``offpolicy/is_clipped_frac`` the tokens
    whose ratio exceeded ``cap``.
    """
    w, ratio = truncated_importance_weights(prox_logp, behaviour_logp, mask, cap=cap)  # [B, T]
    adv = jnp.asarray(advantages, jnp.float32)
    adv = adv if adv.ndim == 2 else adv[:, None]
    n = jnp.sum(mask, dtype=jnp.float32)

    def mean(x):
        return Mean(jnp.sum(jnp.where(mask, x, 0.0)), n)

    diff = jnp.abs(jax.lax.stop_gradient(prox_logp) - behaviour_logp)
    return adv * w, {"offpolicy/logprob_diff": mean(diff), "offpolicy/is_weight_mean": mean(w),
                     "offpolicy/is_clipped_frac": mean((ratio > cap).astype(jnp.float32))}


def correct_rollout(ro: Rollout, prox_logp, *, cap: float) -> tuple[Rollout, dict]:
    """The whole rollout re-centred on ``prox_logp`` (scored before the minibatch updates):
    ``old_logp`` becomes the proximal log-probs and the advantages carry the weights."""
    mask = ro.mask if ro.live is None else ro.mask & ro.live[:, None]
    prox = jax.lax.stop_gradient(prox_logp)
    adv, acc = corrected_advantages(ro.advantages, prox, ro.old_logp, mask, cap=cap)
    return ro._replace(old_logp=prox, advantages=adv), {k: v.compute() for k, v in acc.items()}


def placeholder(shapes) -> Any:
    """Zeros shaped like ``jax.eval_shape``'s output (None leaves kept)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


__all__ = ["Pending", "corrected_advantages", "correct_rollout", "placeholder"]
