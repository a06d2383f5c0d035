"""Knowledge distillation on token distributions (student learns the teacher's).

Per position, with distributions at temperature ``tau`` (Hinton et al., 2015, who scale the
loss by ``tau^2`` so gradient magnitudes do not shrink as ``tau`` grows; we do the same):

* forward KL ``KL(p_teacher || p_student)``: mode-covering (classic KD);
* reverse KL ``KL(p_student || p_teacher)``: mode-seeking (MiniLLM, Gu et al., 2024);
* generalised JSD ``JSD_beta(p_teacher || p_student)`` (GKD, Agarwal et al., 2024).

Each returns ``(loss_sum, count, metrics)`` with the token mean of the unscaled divergence.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from rlhf_jax.losses._common import as_mask, mean_stat
from rlhf_jax.ops.aggregation import aggregate_loss
from rlhf_jax.ops.kl import generalized_jsd_from_logits, kl_from_logits
from rlhf_jax.types import Mask

LossOut = tuple[Float[Array, ""], Float[Array, ""], dict]


def _finish(div, mask, temperature, aggregation, max_tokens, name) -> LossOut:
    m = as_mask(mask, div.shape)
    total, count = aggregate_loss(div * temperature**2, m, mode=aggregation,
                                  max_tokens=max_tokens)
    return total, count, {name: mean_stat(div, m)}


def forward_kl_distill_loss(
    student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], mask: Mask, *,
    temperature: float = 1.0, aggregation: str = "token_mean", max_tokens: int | None = None,
) -> LossOut:
    """``tau^2 KL(p_T || p_S)`` per token, aggregated."""
    div = kl_from_logits(teacher_logits, student_logits, temperature=temperature)
    return _finish(div, mask, temperature, aggregation, max_tokens, "forward_kl")


def reverse_kl_distill_loss(
    student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], mask: Mask, *,
    temperature: float = 1.0, aggregation: str = "token_mean", max_tokens: int | None = None,
) -> LossOut:
    """``tau^2 KL(p_S || p_T)`` per token, aggregated."""
    div = kl_from_logits(student_logits, teacher_logits, temperature=temperature)
    return _finish(div, mask, temperature, aggregation, max_tokens, "reverse_kl")


def jsd_distill_loss(
    student_logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], mask: Mask, *,
    beta: float = 0.5, temperature: float = 1.0, aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> LossOut:
    """``tau^2 JSD_beta(p_T || p_S)`` per token, aggregated; ``0 < beta < 1``."""
    div = generalized_jsd_from_logits(teacher_logits, student_logits, beta=beta,
                                      temperature=temperature)
    return _finish(div, mask, temperature, aggregation, max_tokens, "jsd")


DISTILL_LOSSES = {
    "forward_kl": forward_kl_distill_loss,
    "reverse_kl": reverse_kl_distill_loss,
    "jsd": jsd_distill_loss,
}
