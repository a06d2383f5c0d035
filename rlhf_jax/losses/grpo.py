"""GRPO-family objectives: the token-level clipped objective with a reference KL, and GSPO.

GRPO (Shao et al., 2024, eq. 3), per token of completion ``i`` in a group:

    l_t = max(-A_i r_t, -A_i clip(r_t, 1 - eps_low, 1 + eps_high)) + beta * KL_t(pi || pi_ref)

with ``KL_t`` any estimator of ``ops.KL_ESTIMATORS`` (GRPO uses k3). The variants are
configuration over this one function: Dr.GRPO = unscaled advantages + ``seq_mean_token_sum_norm``;
DAPO = ``clip_eps_high > clip_eps_low`` + ``token_mean`` + ``kl_coef=0``.

GSPO (Zheng et al., 2025) uses one importance ratio per sequence, the geometric mean of the token
ratios, ``s_i = exp(mean_t (logp - old_logp))``, clipped at the sequence level.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.losses._common import as_mask, clean_log_ratio, max_stat, mean_stat, min_stat
from rlhf_jax.losses.ppo import LossOut, clipped_surrogate
from rlhf_jax.ops.aggregation import aggregate_loss
from rlhf_jax.ops.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP
from rlhf_jax.ops.masked import masked_count, masked_sum
from rlhf_jax.types import Mask


def _kl_term(logp, ref_logp, m, kl_coef, kl_estimator, clamp):
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; one of {sorted(KL_ESTIMATORS)}")
    if ref_logp is None:
        if kl_coef:
            raise ValueError("kl_coef > 0 needs ref_logp")
        return jnp.zeros(logp.shape, jnp.float32), None
    kl = jnp.where(m, KL_ESTIMATORS[kl_estimator](logp, ref_logp, clamp=clamp, mask=m), 0.0)
    return kl, mean_stat(kl, m)


def grpo_loss(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"] | None,
    advantages: Float[Array, " B"] | Float[Array, "B T"],
    mask: Mask,
    *,
    ref_logp: Float[Array, "B T"] | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "seq_mean_token_mean",
    max_tokens: int | None = None,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> LossOut:
    """GRPO-family token objective.

    Args:
      logp, old_logp: ``[B, T]`` current and sampling-time log-probs. ``old_logp=None`` means
        one update per batch (``old = stop_gradient(logp)``, ratio 1 with the policy gradient).
      advantages: ``[B]`` group advantages (``ops.group_advantages`` / ``rloo_advantages``) or
        ``[B, T]``.
      ref_logp: ``[B, T]`` frozen reference log-probs, needed when ``kl_coef > 0``.
      kl_estimator: key of ``ops.KL_ESTIMATORS``.
      aggregation: key of ``ops.AGGREGATIONS`` (GRPO: seq-mean-token-mean; DAPO: token-mean;
        Dr.GRPO: seq-mean-token-sum-norm).

    Returns:
      ``(loss_sum, count, metrics)``: the surrogate's metrics plus ``kl`` when a reference is
      given.
    """
    m = as_mask(mask, logp.shape)
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    loss, metrics = clipped_surrogate(
        logp, old_logp, advantages, m, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp,
    )
    kl, kl_stat = _kl_term(logp, ref_logp, m, kl_coef, kl_estimator, log_ratio_clamp)
    if kl_stat is not None:
        metrics["kl"] = kl_stat
        loss = loss + kl_coef * kl
    total, count = aggregate_loss(loss, m, mode=aggregation, max_tokens=max_tokens)
    return total, count, metrics


def gspo_loss(
    logp: Float[Array, "B T"],
    old_logp: Float[Array, "B T"] | None,
    advantages: Float[Array, " B"],
    mask: Mask,
    *,
    ref_logp: Float[Array, "B T"] | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_eps_low: float = 3e-4,
    clip_eps_high: float = 4e-4,
    log_ratio_clamp: float = LOG_RATIO_CLAMP,
) -> LossOut:
    """GSPO: sequence-level clipped objective (defaults are the paper's clip range).

    ``s_i = exp(sum_t m_t (logp_t - old_logp_t) / |y_i|)``;
    ``l_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)) + beta mean_t KL_t``.

    Returns ``(sum_i l_i, number of non-empty sequences, metrics)`` with the sequence-level clip
    fraction and ratio statistics.
    """
    m = as_mask(mask, logp.shape)
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    n_tok = masked_count(m, axis=-1)  # [B]
    live = n_tok > 0
    seq_lr = masked_sum(clean_log_ratio(logp, old_logp, m, log_ratio_clamp), m, axis=-1)
    seq_lr = jnp.clip(seq_lr / jnp.maximum(n_tok, 1.0), -log_ratio_clamp, log_ratio_clamp)
    s = jnp.exp(seq_lr)  # [B]
    adv = jnp.asarray(advantages, jnp.float32)
    chex.assert_shape(adv, s.shape)  # one advantage per sequence
    adv = jnp.where(live, adv, 0.0)
    per_seq = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
    clipped = ((s < 1.0 - clip_eps_low) & (adv < 0)) | ((s > 1.0 + clip_eps_high) & (adv > 0))
    metrics = {
        "clip_frac": mean_stat(clipped.astype(jnp.float32), live),
        "ratio_mean": mean_stat(s, live),
        "ratio_max": max_stat(s, live),
        "ratio_min": min_stat(s, live),
    }
    kl, kl_stat = _kl_term(logp, ref_logp, m, kl_coef, kl_estimator, log_ratio_clamp)
    if kl_stat is not None:
        metrics["kl"] = kl_stat
        per_seq = per_seq + kl_coef * masked_sum(kl, m, axis=-1) / jnp.maximum(n_tok, 1.0)
    total = jnp.sum(jnp.where(live, per_seq, 0.0))
    return total, jnp.sum(live.astype(jnp.float32)), metrics
