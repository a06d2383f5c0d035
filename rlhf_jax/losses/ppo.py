"""PPO losses: clipped policy surrogate, clipped value loss, entropy bonus.

Policy (Schulman et al., 2017), per token, with ``r = exp(clip(logp - old_logp))``:

    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))

Separate ``eps_low``/``eps_high`` is DAPO's clip-higher (Yu et al., 2025). Dual clip (Ye et al.,
2020) caps the loss of negative-advantage tokens at ``-c A`` (``c > 1``) so a huge ratio cannot
blow it up. Value (the PPO2 baseline implementation):

    l_v = 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)

Each returns ``(loss_sum, count, metrics)``; per-token terms are aggregated with
``ops.aggregate_loss``.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.losses._common import (
    as_mask,
    clean_log_ratio,
    max_stat,
    mean_stat,
    min_stat,
    per_sequence_broadcast,
)
from rlhf_jax.ops.aggregation import aggregate_loss
from rlhf_jax.ops.kl import LOG_RATIO_CLAMP, kl_k3
from rlhf_jax.ops.stats import ExplainedVariance
from rlhf_jax.types import Mask

LossOut = tuple[Float[Array, ""], Float[Array, ""], dict]


def clipped_surrogate(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"],
    mask: Mask,
    *,
    clip_eps_low: float,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> tuple[Float[Array, "B T"], dict]:
    """Per-token clipped surrogate loss and its diagnostics (shared by PPO and GRPO).

    Returns ``(per_token_loss [B, T], metrics)``; masked tokens have loss 0.
    """
    hi = clip_eps_low if clip_eps_high is None else clip_eps_high
    if clip_eps_low < 0 or hi < 0:
        raise ValueError(f"clip epsilons must be >= 0, got {clip_eps_low}, {hi}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = as_mask(mask, logp.shape)
    adv = jnp.where(m, per_sequence_broadcast(advantages, logp.shape), 0.0)
    log_ratio = clean_log_ratio(logp, old_logp, m, log_ratio_clamp)  # [B, T]
    ratio = jnp.exp(log_ratio)
    loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + hi))
    clip_low = (ratio < 1.0 - clip_eps_low) & (adv < 0)
    clip_high = (ratio > 1.0 + hi) & (adv > 0)
    metrics = {}
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (loss > cap)
        loss = jnp.where(dual, cap, loss)
        metrics["dual_clip_frac"] = mean_stat(dual.astype(jnp.float32), m)
    loss = jnp.where(m, loss, 0.0)
    f32 = jnp.float32
    metrics |= {
        "clip_frac": mean_stat((clip_low | clip_high).astype(f32), m),
        "clip_frac_low": mean_stat(clip_low.astype(f32), m),
        "clip_frac_high": mean_stat(clip_high.astype(f32), m),
        # KL(pi_old || pi) from samples of pi_old, k3 estimator
        "approx_kl": mean_stat(kl_k3(old_logp, logp, clamp=log_ratio_clamp, mask=m), m),
        "ratio_mean": mean_stat(ratio, m),
        "ratio_max": max_stat(ratio, m),
        "ratio_min": min_stat(ratio, m),
    }
    return loss, metrics


def ppo_policy_loss(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"],
    advantages: Float[Array, "B T"] | Float[Array, " B"],
    mask: Mask,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> LossOut:
    """PPO clipped policy loss.

    Args:
      logp: ``[B, T]`` log-probs of the taken tokens under the current policy.
      old_logp: ``[B, T]`` the same under the policy that sampled them.
      advantages: ``[B, T]`` (or ``[B]``, broadcast over tokens).
      mask: ``[B, T]`` completion mask.
      clip_eps_low, clip_eps_high: clip range ``[1 - low, 1 + high]`` (high defaults to low).
      dual_clip: ``c > 1`` enables dual clipping for negative advantages.

    Returns:
      ``(loss_sum, count, metrics)``: clip fractions (low, high, total, dual), ``approx_kl``
      (k3 of the old policy to the new) and ratio mean/max/min.
    """
    loss, metrics = clipped_surrogate(
        logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp,
    )
    total, count = aggregate_loss(loss, as_mask(mask, logp.shape), mode=aggregation,
                                  max_tokens=max_tokens)
    return total, count, metrics


def value_loss(
    values: Float[Array, "B T"],
    old_values: Float[Array, "B T"],
    returns: Float[Array, "B T"],
    mask: Mask,
    *,
    clip_eps: float | None = 0.2,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> LossOut:
    """Clipped value loss ``0.5 max((V - R)^2, (V_clip - R)^2)``; unclipped if ``clip_eps=None``.

    ``explained_variance`` is ``1 - Var[R - V_old] / Var[R]``: how well the rollout-time value
    predictions explain the returns (as in baselines / cleanrl). ``value_clip_frac`` is the
    fraction of valid tokens whose clip is active, ``|V - V_old| > eps_v`` (whichever branch
    the ``max`` then picks).
    """
    chex.assert_equal_shape([values, old_values, returns])
    m = as_mask(mask, values.shape)
    v = jnp.where(m, values.astype(jnp.float32), 0.0)
    v_old = jnp.where(m, old_values.astype(jnp.float32), 0.0)
    ret = jnp.where(m, returns.astype(jnp.float32), 0.0)
    unclipped = jnp.square(v - ret)
    metrics = {}
    if clip_eps is None:
        per_tok = 0.5 * unclipped
    else:
        v_clip = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
        clipped = jnp.square(v_clip - ret)
        per_tok = 0.5 * jnp.maximum(unclipped, clipped)
        # Clip active, from the raw difference: comparing the two loss branches would flip on
        # the 1-ulp float32 noise of ``V_old + (V - V_old)`` for unclipped tokens.
        active = jnp.abs(v - v_old) > clip_eps
        metrics["value_clip_frac"] = mean_stat(active.astype(jnp.float32), m)
    total, count = aggregate_loss(per_tok, m, mode=aggregation, max_tokens=max_tokens)
    metrics |= {
        "values": mean_stat(v, m),
        "returns": mean_stat(ret, m),
        "explained_variance": ExplainedVariance.of(ret, v_old, m),
    }
    return total, count, metrics


def entropy_bonus(
    entropy: Float[Array, "B T"],
    mask: Mask,
    *,
    coef: float,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> LossOut:
    """Entropy regulariser as a loss: ``-coef * H`` per token (minimising it raises entropy)."""
    m = as_mask(mask, entropy.shape)
    ent = jnp.where(m, entropy.astype(jnp.float32), 0.0)
    total, count = aggregate_loss(-coef * ent, m, mode=aggregation, max_tokens=max_tokens)
    return total, count, {"entropy": mean_stat(ent, m)}
