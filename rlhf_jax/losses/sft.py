"""Supervised fine-tuning: masked next-token negative log-likelihood.

``L = -sum_t m_t log pi(y_t | y_<t)``, aggregated by ``aggregation`` (token-mean by default, so
every supervised token weighs the same however the batch is split). The mask selects completion
(assistant) tokens: prompts and padding are not trained on.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from rlhf_jax.losses._common import as_mask, mean_stat
from rlhf_jax.ops.aggregation import aggregate_loss
from rlhf_jax.ops.stats import Mean
from rlhf_jax.types import Mask


def sft_loss(
    token_logp: Float[Array, "B T"],
    mask: Mask,
    *,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""], dict[str, Mean]]:
    """Masked NLL of the target tokens.

    Args:
      token_logp: ``[B, T]`` log pi(y_t) from ``ops.token_logprobs``.
      mask: ``[B, T]``, 1 on supervised (completion) tokens.
      aggregation: a key of ``ops.AGGREGATIONS``.

    Returns:
      ``(loss_sum, count, metrics)``; ``metrics["nll"]`` is the token-mean NLL whatever the
      aggregation (``exp`` of it is the perplexity).
    """
    m = as_mask(mask, token_logp.shape)
    nll = -token_logp.astype("float32")
    total, count = aggregate_loss(nll, m, mode=aggregation, max_tokens=max_tokens)
    return total, count, {"nll": mean_stat(nll, m)}
