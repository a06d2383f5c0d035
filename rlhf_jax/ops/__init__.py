"""Pure array operations for post-training: no models, optimizers or I/O are imported here."""

from rlhf_jax.ops.advantages import (
    discounted_returns,
    gae_advantages,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_jax.ops.aggregation import (
    AGGREGATIONS,
    aggregate_loss,
    safe_divide,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from rlhf_jax.ops.importance import truncated_importance_weights
from rlhf_jax.ops.kl import (
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    generalized_jsd_from_logits,
    kl_from_logits,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_straight_through,
)
from rlhf_jax.ops.kl_control import (
    KL_CONTROLLERS,
    KLControllerState,
    adaptive_kl_update,
    fixed_kl_update,
    kl_controller_init,
)
from rlhf_jax.ops.logprobs import (
    NEG_INF,
    chunked_entropy,
    chunked_logprobs_and_entropy,
    chunked_token_logprobs,
    entropy_from_logits,
    token_logprobs,
)
from rlhf_jax.ops.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.ops.masks import completion_mask_from_eos, is_truncated, last_token_index
from rlhf_jax.ops.stats import (
    ExplainedVariance,
    Max,
    Mean,
    Min,
    compute_metrics,
    merge_metrics,
)

__all__ = [
    # log-probs and entropy
    "token_logprobs",
    "entropy_from_logits",
    "chunked_token_logprobs",
    "chunked_entropy",
    "chunked_logprobs_and_entropy",
    "NEG_INF",
    # masked reductions
    "masked_sum",
    "masked_count",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    # masks
    "completion_mask_from_eos",
    "is_truncated",
    "last_token_index",
    # KL
    "truncated_importance_weights",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_straight_through",
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "kl_from_logits",
    "generalized_jsd_from_logits",
    # KL controllers
    "KLControllerState",
    "kl_controller_init",
    "fixed_kl_update",
    "adaptive_kl_update",
    "KL_CONTROLLERS",
    # advantages
    "discounted_returns",
    "gae_advantages",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    # aggregation
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
    "AGGREGATIONS",
    "aggregate_loss",
    "safe_divide",
    # metric accumulators
    "Mean",
    "Max",
    "Min",
    "ExplainedVariance",
    "merge_metrics",
    "compute_metrics",
]
