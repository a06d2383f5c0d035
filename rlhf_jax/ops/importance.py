r"""Truncated importance weights for a rollout sampled by an older policy (one-step-off).

When the rollout of step ``t`` was sampled by the behaviour policy ``pi_behav`` (the params
before the previous update, ``theta_{t-1}``) but the update starts from ``theta_t``, the
clipped surrogate is "decoupled" (Hilton et al. 2021, "Batch size-invariance for policy
optimization"; AReaL, Fu et al. 2025, eq. 5): its trust region is centred on the proximal
policy ``pi_prox = pi_{theta_t}`` and each token is re-weighted from the behaviour policy to it,

    J(theta) = E_{y ~ pi_behav} [ w_t * min(u_t A_t, clip(u_t, 1 - eps, 1 + eps) A_t) ],
    u_t = pi_theta(y_t) / pi_prox(y_t),
    w_t = min(pi_prox(y_t) / pi_behav(y_t), C),

with the weight truncated at ``C`` (truncated importance sampling, TIS: Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"; verl's
``tis_imp_ratio_cap``, default 2). ``w_t`` is a constant of the update (no gradient).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.ops.kl import LOG_RATIO_CLAMP
from rlhf_jax.types import Mask


def truncated_importance_weights(
    prox_logp: Float[Array, "B T"],
    behaviour_logp: Float[Array, "B T"],
    mask: Mask,
    *,
    cap: float,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """``(w, ratio)``: ``ratio_t = exp(prox_t - behaviour_t)`` and ``w_t = min(ratio_t, cap)``
    on masked tokens (both 0 elsewhere), without gradient. The log-ratio is clamped to
    ``+-log_ratio_clamp`` before ``exp`` and masked positions are zeroed first, so ``-inf``
    log-probs give finite weights.

    >>> w, r = truncated_importance_weights(jnp.log(jnp.array([[0.5, 0.9]])),
    ...     jnp.log(jnp.array([[0.25, 0.3]])), jnp.array([[True, True]]), cap=2.5)
    >>> [round(float(x), 4) for x in w[0]]
    [2.0, 2.5]
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    chex.assert_equal_shape([prox_logp, behaviour_logp, mask])
    m = jnp.asarray(mask, bool)
    lr = jnp.where(m, prox_logp - behaviour_logp, 0.0)  # [B, T], masked first ("double where")
    ratio = jnp.exp(jnp.clip(lr, -log_ratio_clamp, log_ratio_clamp))
    ratio = jax.lax.stop_gradient(jnp.where(m, ratio, 0.0))
    return jnp.minimum(ratio, cap), ratio


__all__ = ["truncated_importance_weights"]
