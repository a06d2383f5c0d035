"""Bradley-Terry reward-model loss on preference pairs (chosen > rejected).

``L_i = -log sigmoid(r_c - r_r - margin_i) + eta (r_c + r_r)^2``.

The margin term is Llama-2's (Touvron et al., 2023, eq. 2): a larger required gap for pairs
rated more distinct. The centering term (Eisenstein et al., 2023, "Helping or Herding") keeps
rewards near zero mean so they are identifiable. ``pair_mask`` drops padding pairs.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.losses._common import as_mask, mean_stat
from rlhf_jax.ops.masked import masked_count, masked_sum
from rlhf_jax.ops.stats import Mean


def bradley_terry_loss(
    chosen_rewards: Float[Array, " B"],
    rejected_rewards: Float[Array, " B"],
    *,
    margin: Float[Array, " B"] | None = None,
    center_coef: float = 0.0,
    pair_mask: Float[Array, " B"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""], dict[str, Mean]]:
    """Pairwise logistic loss with pairwise accuracy.

    Args:
      chosen_rewards, rejected_rewards: ``[B]`` scalar rewards of each pair's two responses.
      margin: optional ``[B]`` required reward gap.
      center_coef: ``eta`` of the centering term (0 disables it).
      pair_mask: optional ``[B]``; 0 marks padding pairs.

    Returns:
      ``(loss_sum, n_pairs, metrics)`` with ``rewards/accuracy`` (strictly ``r_c > r_r``), mean
      chosen and rejected rewards and the mean margin ``r_c - r_r``.
    """
    rc = jnp.asarray(chosen_rewards, jnp.float32)
    rr = jnp.asarray(rejected_rewards, jnp.float32)
    chex.assert_equal_shape([rc, rr] if margin is None else [rc, rr, jnp.asarray(margin)])
    m = as_mask(pair_mask, rc.shape)
    # Padding pairs may hold anything (inf, NaN): zero them *before* the loss ("double where"),
    # or their NaN would leak into the gradient through the zero cotangent of masked_sum.
    rc = jnp.where(m, rc, 0.0)
    rr = jnp.where(m, rr, 0.0)
    diff = rc - rr
    if margin is not None:
        logits = diff - jnp.where(m, jnp.asarray(margin, jnp.float32), 0.0)
    else:
        logits = diff
    per_pair = -jax.nn.log_sigmoid(logits)
    if center_coef:
        per_pair = per_pair + center_coef * jnp.square(rc + rr)
    metrics = {
        "rewards/accuracy": mean_stat((diff > 0).astype(jnp.float32), m),
        "rewards/chosen": mean_stat(rc, m),
        "rewards/rejected": mean_stat(rr, m),
        "rewards/margin": mean_stat(diff, m),
    }
    return masked_sum(per_pair, m), masked_count(m), metrics
