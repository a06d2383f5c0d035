"""Pure loss functions: arrays in, ``(loss_sum, count, metrics)`` out.

Divide ``loss_sum`` by ``count`` once, after summing over micro-batches and devices
(``rlhf_jax.ops.safe_divide``); metrics are accumulators (``rlhf_jax.ops.Mean`` etc.) that
``rlhf_jax.ops.compute_metrics`` turns into numbers.
"""

from rlhf_jax.losses.distill import (
    DISTILL_LOSSES,
    forward_kl_distill_loss,
    jsd_distill_loss,
    reverse_kl_distill_loss,
)
from rlhf_jax.losses.dpo import (
    DPO_LOSSES,
    REFERENCE_FREE_LOSSES,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from rlhf_jax.losses.grpo import grpo_loss, gspo_loss
from rlhf_jax.losses.ppo import clipped_surrogate, entropy_bonus, ppo_policy_loss, value_loss
from rlhf_jax.losses.reward_model import bradley_terry_loss
from rlhf_jax.losses.sft import sft_loss

__all__ = [
    "sft_loss",
    "bradley_terry_loss",
    "clipped_surrogate",
    "ppo_policy_loss",
    "value_loss",
    "entropy_bonus",
    "grpo_loss",
    "gspo_loss",
    "dpo_loss",
    "cdpo_loss",
    "robust_dpo_loss",
    "ipo_loss",
    "simpo_loss",
    "orpo_loss",
    "DPO_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "forward_kl_distill_loss",
    "reverse_kl_distill_loss",
    "jsd_distill_loss",
    "DISTILL_LOSSES",
]
