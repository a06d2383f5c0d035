"""Loss aggregation: turn per-token losses into an exact ``(sum, count)`` pair.

The trainer adds the sums and the counts of every micro-batch and device and divides once, so
the loss (and its gradient) is identical whether a batch is processed whole, in micro-batches or
sharded. Each mode is its own function, chosen from ``AGGREGATIONS`` by name:

======================================  ===================================  =====================
mode                                    sum                                  count
======================================  ===================================  =====================
``token_mean``                          sum_b sum_t l m                      sum_b sum_t m
``seq_mean_token_mean``                 sum_b (sum_t l m / sum_t m)          non-empty sequences
``seq_mean_token_sum``                  sum_b sum_t l m                      non-empty sequences
``seq_mean_token_sum_norm`` (Dr.GRPO)   sum_b sum_t l m / max_tokens         non-empty sequences
======================================  ===================================  =====================

Sequences whose mask is empty (padding rows, fully truncated completions) contribute 0 to the
sum and are not counted. References: DAPO (Yu et al., 2025) for token-mean; Dr.GRPO (Liu et al.,
2025) for the constant ``max_tokens`` normaliser.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.ops.masked import masked_count, masked_sum
from rlhf_jax.types import Mask

LossSum = tuple[Float[Array, ""], Float[Array, ""]]


def _check(loss, mask) -> None:
    """``loss`` and ``mask`` are both ``[B, T]``: a broadcast ``[T]`` or ``[1, T]`` mask would give
    the per-row counts of one row, a ``[B]`` one would mask columns."""
    chex.assert_rank(loss, 2)
    chex.assert_equal_shape([loss, jnp.asarray(mask)])


def _nonempty_rows(mask) -> jnp.ndarray:
    return jnp.sum((masked_count(mask, axis=-1) > 0).astype(jnp.float32))


def token_mean(loss: Float[Array, "B T"], mask: Mask, *, max_tokens: int | None = None) -> LossSum:
    """Every valid token weighs the same: ``(sum l m, sum m)``."""
    del max_tokens
    _check(loss, mask)
    return masked_sum(loss, mask), masked_count(mask)


def seq_mean_token_mean(
    loss: Float[Array, "B T"], mask: Mask, *, max_tokens: int | None = None
) -> LossSum:
    """Every sequence weighs the same; tokens are averaged inside each (the GRPO paper)."""
    del max_tokens
    _check(loss, mask)
    per_seq = masked_sum(loss, mask, axis=-1) / jnp.maximum(masked_count(mask, axis=-1), 1.0)
    return jnp.sum(per_seq), _nonempty_rows(mask)


def seq_mean_token_sum(
    loss: Float[Array, "B T"], mask: Mask, *, max_tokens: int | None = None
) -> LossSum:
    """Token losses are summed inside a sequence and averaged over sequences."""
    del max_tokens
    _check(loss, mask)
    return masked_sum(loss, mask), _nonempty_rows(mask)


def seq_mean_token_sum_norm(
    loss: Float[Array, "B T"], mask: Mask, *, max_tokens: int | None = None
) -> LossSum:
    """Dr.GRPO: token sums over a constant ``max_tokens`` (default ``T``), mean over sequences."""
    _check(loss, mask)
    norm = float(loss.shape[-1] if max_tokens is None else max_tokens)
    if norm <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    return masked_sum(loss, mask) / norm, _nonempty_rows(mask)


AGGREGATIONS = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum": seq_mean_token_sum,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


def aggregate_loss(
    loss: Float[Array, "B T"], mask: Mask, *, mode: str, max_tokens: int | None = None
) -> LossSum:
    """Dispatch to the aggregation named ``mode`` (a key of ``AGGREGATIONS``).

    ``mask`` is ``[B, T]`` or broadcasts to it at the same rank (``[B, 1]``: whole rows); a
    ``[T]`` or ``[B]`` mask is an error, as NumPy's right-aligned broadcasting would misread it.
    """
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown aggregation {mode!r}; choose one of {sorted(AGGREGATIONS)}") from None
    mask = jnp.asarray(mask)
    chex.assert_rank(mask, jnp.ndim(loss))
    return fn(loss, jnp.broadcast_to(mask, jnp.shape(loss)), max_tokens=max_tokens)


def safe_divide(total: Float[Array, "..."], count: Float[Array, "..."]) -> Float[Array, "..."]:
    """``total / count``, 0 where ``count`` is 0: the trainer's one division."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
