"""KL divergence: per-token sample estimators and exact divergences between logit tensors.

Per-token estimators of ``KL(pi || pi_ref)`` from the log-probs of tokens sampled from ``pi``
(Schulman, "Approximating KL Divergence", 2020), with ``log r = logp_ref - logp``:

* ``k1 = -log r``                  unbiased, high variance, can be negative;
* ``k2 = (log r)^2 / 2``           biased, low variance, its gradient is the KL's gradient;
* ``k3 = (r - 1) - log r``         unbiased, non-negative, low variance (GRPO's choice);
* ``k3_st``: the value of k3 with the gradient of k2 (straight-through), unbiased in value and in
  gradient direction when the KL is used as a loss.

``log r`` is clamped to ``[-clamp, clamp]`` before ``exp`` so ratios of +-inf stay finite. A NaN
log-ratio is *not* cleaned: it propagates to the output (so the trainer's non-finite guard skips
the update) unless its position is masked out by the optional ``mask`` keyword, which zeroes the
log-ratio *before* any arithmetic (the "double where"), so masked positions give 0 with finite
gradients whatever they hold. A token with log-prob ``-inf`` under both gives ``log r = 0``.
Callers that mask afterwards (``where(mask, kl(...), 0)``) must pass ``mask`` too, or a NaN at a
masked position leaks into the gradient of k2/k3.
``KL_ESTIMATORS`` is the one table pipelines and configs choose from.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.types import Mask

LOG_RATIO_CLAMP = 20.0


def _plogp_ratio(la: jax.Array, lb: jax.Array) -> jax.Array:
    """sum_v exp(la) (la - lb), with 0 log 0 = 0 (vocabulary entries masked to -inf)."""
    p = jnp.exp(la)
    live = p > 0
    diff = jnp.where(live, la - jnp.where(live, lb, 0.0), 0.0)
    return jnp.sum(p * diff, axis=-1)


def _log_ratio(logp: jax.Array, ref_logp: jax.Array, clamp: float, mask) -> jax.Array:
    chex.assert_equal_shape([logp, ref_logp])  # a [B, 1] or [T] reference would broadcast
    a, b = logp.astype(jnp.float32), ref_logp.astype(jnp.float32)
    impossible = (a == -jnp.inf) & (b == -jnp.inf)  # -inf - -inf would be NaN: log r = 0
    lr = jnp.where(impossible, 0.0, b - a)
    if mask is not None:
        m = jnp.asarray(mask)
        chex.assert_equal_shape([lr, m])
        lr = jnp.where(m.astype(bool), lr, 0.0)  # first where: masked NaN never reaches exp
    return jnp.clip(lr, -clamp, clamp)  # NaN stays NaN


def kl_k1(
    logp: Float[Array, "*S"],
    ref_logp: Float[Array, "*S"],
    *,
    clamp: float = LOG_RATIO_CLAMP,
    mask: Mask | None = None,
) -> Float[Array, "*S"]:
    """k1 = log pi(y) - log pi_ref(y); NaN propagates unless masked out (0 where ``mask`` is 0).

    >>> float(kl_k1(jnp.array(-1.0), jnp.array(-2.0)))
    1.0
    """
    return -_log_ratio(logp, ref_logp, clamp, mask)


def kl_k2(
    logp: Float[Array, "*S"],
    ref_logp: Float[Array, "*S"],
    *,
    clamp: float = LOG_RATIO_CLAMP,
    mask: Mask | None = None,
) -> Float[Array, "*S"]:
    """k2 = (log pi_ref(y) - log pi(y))^2 / 2; NaN propagates unless masked out (see module)."""
    return 0.5 * jnp.square(_log_ratio(logp, ref_logp, clamp, mask))


def kl_k3(
    logp: Float[Array, "*S"],
    ref_logp: Float[Array, "*S"],
    *,
    clamp: float = LOG_RATIO_CLAMP,
    mask: Mask | None = None,
) -> Float[Array, "*S"]:
    """k3 = exp(log r) - 1 - log r with log r = log pi_ref(y) - log pi(y); always >= 0.

    NaN propagates unless masked out (see the module docstring).
    """
    lr = _log_ratio(logp, ref_logp, clamp, mask)
    return jnp.expm1(lr) - lr


def kl_k3_straight_through(
    logp: Float[Array, "*S"],
    ref_logp: Float[Array, "*S"],
    *,
    clamp: float = LOG_RATIO_CLAMP,
    mask: Mask | None = None,
) -> Float[Array, "*S"]:
    """Value of k3, gradient of k2: ``k2 + stop_gradient(k3 - k2)``; NaN as in ``kl_k3``."""
    k2 = kl_k2(logp, ref_logp, clamp=clamp, mask=mask)
    k3 = kl_k3(logp, ref_logp, clamp=clamp, mask=mask)
    return k2 + jax.lax.stop_gradient(k3 - k2)


KL_ESTIMATORS = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "k3_st": kl_k3_straight_through,
}


def kl_from_logits(
    p_logits: Float[Array, "B T V"],
    q_logits: Float[Array, "B T V"],
    *,
    temperature: float = 1.0,
) -> Float[Array, "B T"]:
    """Exact ``KL(P || Q) = sum_v P_v (log P_v - log Q_v)`` per position, in float32.

    Forward KL of a student ``Q`` to a teacher ``P`` is ``kl_from_logits(teacher, student)``;
    reverse KL swaps the arguments. Both are computed with log-softmax in float32.
    """
    chex.assert_equal_shape([p_logits, q_logits])
    lp = jax.nn.log_softmax(p_logits.astype(jnp.float32) / temperature, axis=-1)
    lq = jax.nn.log_softmax(q_logits.astype(jnp.float32) / temperature, axis=-1)
    return _plogp_ratio(lp, lq)


def generalized_jsd_from_logits(
    p_logits: Float[Array, "B T V"],
    q_logits: Float[Array, "B T V"],
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Float[Array, "B T"]:
    """Generalised Jensen-Shannon divergence (Agarwal et al., GKD, 2024).

    ``JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``,
    for ``0 < beta < 1``; ``beta = 0.5`` is the usual JSD, bounded by ``log 2``.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    chex.assert_equal_shape([p_logits, q_logits])
    lp = jax.nn.log_softmax(p_logits.astype(jnp.float32) / temperature, axis=-1)
    lq = jax.nn.log_softmax(q_logits.astype(jnp.float32) / temperature, axis=-1)
    # log M; where both P and Q are masked to -inf, logaddexp(-inf, -inf) has a NaN gradient,
    # so those entries are computed on zeros and set to -inf (the "double where").
    live = jnp.maximum(lp, lq) > -jnp.inf
    a, b = jnp.where(live, lp, 0.0), jnp.where(live, lq, 0.0)
    lm = jnp.where(live, jnp.logaddexp(a + jnp.log(beta), b + jnp.log1p(-beta)), -jnp.inf)
    return beta * _plogp_ratio(lp, lm) + (1.0 - beta) * _plogp_ratio(lq, lm)
