"""Direct preference optimisation and its family; each variant is its own function.

Inputs are *sequence* log-probs ``[B]`` (sums of completion token log-probs) of each pair's
chosen and rejected responses. With ``h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) -
log pi_ref(y_r))``, ``lp`` a sequence log-prob, ``n = max(|y|, 1)`` its token count and
``odds = p / (1 - p)`` with ``p = exp(lp / n)``:

===================  =====================================================  ======================
function             per-pair loss                                          reference
===================  =====================================================  ======================
``dpo_loss``         ``-log sigmoid(beta h)``                               Rafailov et al., 2023
``cdpo_loss``        ``(1-e) dpo(h) + e dpo(-h)`` (label smoothing)         Mitchell, 2023
``robust_dpo_loss``  ``((1-e) dpo(h) - e dpo(-h)) / (1 - 2e)``              Chowdhury et al., 2024
``ipo_loss``         ``(h - 1 / (2 beta))^2``                               Azar et al., 2024
``simpo_loss``       ``-log sigmoid(beta (lp_c/n_c - lp_r/n_r) - gamma)``   Meng et al., 2024
``orpo_loss``        ``-lp_c/n_c - lam log sigmoid(log(odds_c / odds_r))``  Hong et al., 2024
===================  =====================================================  ======================

SimPO and ORPO need no reference model. Every function returns ``(loss_sum, n_pairs, metrics)``
with the implicit rewards (``rewards/chosen``, ``rewards/rejected``), their margin and the
preference accuracy (``rewards/accuracy``: chosen reward strictly higher).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from rlhf_jax.losses._common import as_mask, mean_stat
from rlhf_jax.ops.masked import masked_count, masked_sum

Seq = Float[Array, " B"]
LossOut = tuple[Float[Array, ""], Float[Array, ""], dict]


def _inputs(pair_mask, *xs):
    """float32 copies of ``xs`` with padding pairs set to 0, and the boolean pair mask.

    The "double where": a padding pair may hold NaN or +-inf log-probs; zeroing them *before*
    the loss keeps its gradient exactly 0 instead of ``0 * NaN``.
    """
    xs = tuple(jnp.asarray(x, jnp.float32) for x in xs)
    chex.assert_equal_shape(xs)  # a [B, 1] input against [B] ones would broadcast to [B, B]
    m = as_mask(pair_mask, xs[0].shape)
    return m, tuple(jnp.where(m, x, 0.0) for x in xs)


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")


def _finish(per_pair, chosen_rewards, rejected_rewards, m, extra=None) -> LossOut:
    margin = chosen_rewards - rejected_rewards
    metrics = {
        "rewards/chosen": mean_stat(chosen_rewards, m),
        "rewards/rejected": mean_stat(rejected_rewards, m),
        "rewards/margin": mean_stat(margin, m),
        "rewards/accuracy": mean_stat((margin > 0).astype(jnp.float32), m),
    }
    for name, value in (extra or {}).items():
        metrics[name] = mean_stat(value, m)
    return masked_sum(per_pair, m), masked_count(m), metrics


def _implicit(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, pair_mask):
    """Implicit rewards ``beta (log pi - log pi_ref)``, the log-ratio margin ``h`` and the mask."""
    _check_beta(beta)
    m, (pc, pr, rc, rr) = _inputs(pair_mask, policy_chosen, policy_rejected, ref_chosen,
                                  ref_rejected)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return chosen, rejected, (pc - rc) - (pr - rr), m


def dpo_loss(policy_chosen_logps: Seq, policy_rejected_logps: Seq, ref_chosen_logps: Seq,
             ref_rejected_logps: Seq, *, beta: float = 0.1, pair_mask: Seq | None = None
             ) -> LossOut:
    """DPO sigmoid loss ``-log sigmoid(beta h)``; see the module table for ``h``."""
    c, r, h, m = _implicit(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps, beta, pair_mask)
    return _finish(-jax.nn.log_sigmoid(beta * h), c, r, m)


def cdpo_loss(policy_chosen_logps: Seq, policy_rejected_logps: Seq, ref_chosen_logps: Seq,
              ref_rejected_logps: Seq, *, beta: float = 0.1, label_smoothing: float = 0.1,
              pair_mask: Seq | None = None) -> LossOut:
    """Conservative (label-smoothed) DPO: labels flipped with probability ``label_smoothing``."""
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    c, r, h, m = _implicit(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps, beta, pair_mask)
    e = label_smoothing
    per = -(1 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)
    return _finish(per, c, r, m)


def robust_dpo_loss(policy_chosen_logps: Seq, policy_rejected_logps: Seq, ref_chosen_logps: Seq,
                    ref_rejected_logps: Seq, *, beta: float = 0.1, label_smoothing: float = 0.1,
                    pair_mask: Seq | None = None) -> LossOut:
    """Robust DPO: unbiased under preference noise of rate ``label_smoothing`` (< 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    c, r, h, m = _implicit(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps, beta, pair_mask)
    e = label_smoothing
    per = (-(1 - e) * jax.nn.log_sigmoid(beta * h)
           + e * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * e)
    return _finish(per, c, r, m)


def ipo_loss(policy_chosen_logps: Seq, policy_rejected_logps: Seq, ref_chosen_logps: Seq,
             ref_rejected_logps: Seq, *, beta: float = 0.1, pair_mask: Seq | None = None
             ) -> LossOut:
    """IPO squared loss ``(h - 1/(2 beta))^2`` (``beta`` is the paper's ``tau``).

    Pass length-normalised log-probs to get TRL's ``ipo`` variant.
    """
    c, r, h, m = _implicit(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                           ref_rejected_logps, beta, pair_mask)
    return _finish(jnp.square(h - 1.0 / (2.0 * beta)), c, r, m)


def _avg(logps, lengths):
    """Length-normalised log-prob ``logp / max(|y|, 1)``."""
    return logps / jnp.maximum(lengths, 1.0)


def simpo_loss(policy_chosen_logps: Seq, policy_rejected_logps: Seq, chosen_lengths: Seq,
               rejected_lengths: Seq, *, beta: float = 2.0, gamma: float = 0.5,
               pair_mask: Seq | None = None) -> LossOut:
    """SimPO: length-normalised, reference-free; rewards are ``beta * logp / |y|``."""
    _check_beta(beta)
    m, (pc, pr, nc, nr) = _inputs(pair_mask, policy_chosen_logps, policy_rejected_logps,
                                  chosen_lengths, rejected_lengths)
    c, r = beta * _avg(pc, nc), beta * _avg(pr, nr)
    return _finish(-jax.nn.log_sigmoid(c - r - gamma), c, r, m)


_TINY = float(np.finfo(np.float32).tiny)  # 1.1754944e-38, the smallest normal float32


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (Maechler, 2012).

    ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))`` otherwise, both exact to float32
    rounding. The only clamp is ``x <= -tiny`` (float32's smallest normal): a certain response
    (``x == 0``, log-odds ``+inf``) gets ``log1mexp = log(tiny) = -87.3`` and log-odds ``87.3``
    with finite value and gradient (the clamp's gradient is 0 there).
    """
    x = jnp.minimum(x, -_TINY)
    near = x > -math.log(2.0)
    a = jnp.log(-jnp.expm1(jnp.where(near, x, -1.0)))
    b = jnp.log1p(-jnp.exp(jnp.where(near, -1.0, x)))
    return jnp.where(near, a, b)


def orpo_loss(policy_chosen_logps: Seq, policy_rejected_logps: Seq, chosen_lengths: Seq,
              rejected_lengths: Seq, *, lam: float = 0.1, pair_mask: Seq | None = None
              ) -> LossOut:
    """ORPO: SFT NLL on the chosen response plus ``lam`` times the odds-ratio loss.

    With ``p = exp(logp / |y|)``, ``log odds = log p - log(1 - p)`` (computed as
    ``a - log1mexp(a)``, ``a = logp / |y|``, exact even for near-certain responses; ``a = 0`` is
    clamped to ``-tiny``, see ``_log1mexp``) and
    ``L = -logp_c / |y_c| - lam log sigmoid(log odds_c - log odds_r)``. Rewards are
    ``lam * logp / |y|`` (as TRL reports them).
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    m, (pc, pr, nc, nr) = _inputs(pair_mask, policy_chosen_logps, policy_rejected_logps,
                                  chosen_lengths, rejected_lengths)
    ac, ar = _avg(pc, nc), _avg(pr, nr)
    log_odds = (ac - _log1mexp(ac)) - (ar - _log1mexp(ar))
    odds_term = -jax.nn.log_sigmoid(log_odds)
    per = -ac + lam * odds_term
    return _finish(per, lam * ac, lam * ar, m,
                   {"nll": -ac, "log_odds_ratio": log_odds, "odds_ratio_loss": odds_term})


DPO_LOSSES = {
    "sigmoid": dpo_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "ipo": ipo_loss,
}
"""Reference-based variants (same signature); ``REFERENCE_FREE_LOSSES`` take lengths instead."""

REFERENCE_FREE_LOSSES = {
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
