"""Knowledge distillation on token distributions (student learns the teacher's).

Per position, with distributions at temperature ``tau`` (Hinton et al., 2015, who scale the
loss by ``tau^2`` so gradient magnitudes do not shrink as ``tau`` grows; we do the same):

* forward KL ``KL(p_teacher || p_student)``: mode-covering (classic KD);
* reverse KL ``KL(p_student || p_teacher)``: mode-seeking (MiniLLM, Gu et al., 2024);
* generalised JSD ``JSD_beta(p_teacher || p_student)`` (GKD, Agarwal et al., 2024).

Each returns ``(loss_sum, count, metrics)`` with the token mean of the unscaled divergence.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.losses._common import as_mask, mean_stat
from rlhf_jax.ops.aggregation import aggregate_loss
from rlhf_jax.ops.kl import generalized_jsd_from_logits, kl_from_logits
from rlhf_jax.types import Mask

LossOut = tuple[Float[Array, ""], Float[Array, ""], dict]


def _inputs(student_logits, teacher_logits, mask, temperature):
    """Boolean ``[B, T]`` mask and both logits with masked positions set to 0.

    The "double where": padding positions may hold NaN or inf logits; zeroing them *before* the
    divergence keeps their gradient exactly 0 instead of ``0 * NaN``.
    """
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chex.assert_equal_shape([student_logits, teacher_logits])
    m = as_mask(mask, jnp.shape(student_logits)[:-1])
    s = jnp.where(m[..., None], student_logits, 0.0)
    t = jnp.where(m[..., None], teacher_logits, 0.0)
    return m, s, t


def _finish(div, m, temperature, aggregation, max_tokens, name) -> LossOut:
    total, count = aggregate_loss(div * temperature**2, m, mode=aggregation,
                                  max_tokens=max_tokens)
    return total, count, {name: mean_stat(div, m)}


def forward_kl_distill_loss(
    student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], mask: Mask, *,
    temperature: float = 1.0, aggregation: str = "token_mean", max_tokens: int | None = None,
) -> LossOut:
    """``tau^2 KL(p_T || p_S)`` per token, aggregated."""
    m, s, t = _inputs(student_logits, teacher_logits, mask, temperature)
    div = kl_from_logits(t, s, temperature=temperature)
    return _finish(div, m, temperature, aggregation, max_tokens, "forward_kl")


def reverse_kl_distill_loss(
    student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], mask: Mask, *,
    temperature: float = 1.0, aggregation: str = "token_mean", max_tokens: int | None = None,
) -> LossOut:
    """``tau^2 KL(p_S || p_T)`` per token, aggregated."""
    m, s, t = _inputs(student_logits, teacher_logits, mask, temperature)
    div = kl_from_logits(s, t, temperature=temperature)
    return _finish(div, m, temperature, aggregation, max_tokens, "reverse_kl")


def jsd_distill_loss(
    student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], mask: Mask, *,
    beta: float = 0.5, temperature: float = 1.0, aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> LossOut:
    """``tau^2 JSD_beta(p_T || p_S)`` per token, aggregated; ``0 < beta < 1``."""
    m, s, t = _inputs(student_logits, teacher_logits, mask, temperature)
    div = generalized_jsd_from_logits(t, s, beta=beta, temperature=temperature)
    return _finish(div, m, temperature, aggregation, max_tokens, "jsd")


DISTILL_LOSSES = {
    "forward_kl": forward_kl_distill_loss,
    "reverse_kl": reverse_kl_distill_loss,
    "jsd": jsd_distill_loss,
}
