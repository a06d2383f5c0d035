"""Returns and advantage estimators: discounted returns, GAE, group baselines, whitening.

Per-token functions take ``[B, T]`` arrays aligned with completion tokens and a ``mask``. Masked
positions get 0 and are *skipped* by the recursions: the value and advantage carried backwards
pass through them unchanged, so right padding, left padding and masked holes (e.g. tool output
in a multi-turn rollout) are all handled. ``bootstrap_value`` ``[B]`` is ``V(s_T)`` for the state
after the last valid token: 0 for a completion that ended with EOS, the value estimate for one cut
off by the length limit.

Group estimators take one scalar reward per completion, ``[B]`` with ``B = N * G`` laid out
prompt-major (the ``G`` completions of prompt ``n`` are rows ``n*G .. n*G + G - 1``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rlhf_jax.ops.masked import masked_whiten
from rlhf_jax.types import Mask


def _token_inputs(mask, bootstrap_value, *arrays):
    """float32 ``[B, T]`` arrays, the boolean mask and the ``[B]`` bootstrap (0 by default).

    Shapes are checked, not broadcast: a ``[T]`` mask or a ``[B, 1]`` bootstrap would otherwise
    run silently (or fail deep inside the scan).
    """
    arrays = [jnp.asarray(a, jnp.float32) for a in arrays]
    m = jnp.asarray(mask).astype(bool)
    chex.assert_rank(arrays[0], 2)
    chex.assert_equal_shape([*arrays, m])
    b = arrays[0].shape[0]
    boot = jnp.zeros(b) if bootstrap_value is None else jnp.asarray(bootstrap_value, jnp.float32)
    chex.assert_shape(boot, (b,))
    return arrays, m, boot


def _reverse_scan(step, init, xs):
    """Scan over time (axis 1 of each ``[B, T]`` leaf) from the end."""
    xs_t = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), xs)  # [T, B]
    _, out = jax.lax.scan(step, init, xs_t, reverse=True)
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), out)


def discounted_returns(
    rewards: Float[Array, "B T"],
    mask: Mask,
    *,
    gamma: float,
    bootstrap_value: Float[Array, " B"] | None = None,
) -> Float[Array, "B T"]:
    """``G_t = r_t + gamma * G_{t+1}`` over valid tokens, ``G`` after the last = bootstrap.

    >>> discounted_returns(jnp.array([[0., 0., 1.]]), jnp.ones((1, 3)), gamma=0.5).tolist()
    [[0.25, 0.5, 1.0]]
    """
    (rewards,), m, boot = _token_inputs(mask, bootstrap_value, rewards)
    rewards = jnp.where(m, rewards, 0.0)

    def step(g_next, x):
        r, valid = x
        g = r + gamma * g_next
        return jnp.where(valid, g, g_next), jnp.where(valid, g, 0.0)

    return _reverse_scan(step, boot, (rewards, m))


def gae_advantages(
    rewards: Float[Array, "B T"],
    values: Float[Array, "B T"],
    mask: Mask,
    *,
    gamma: float,
    lam: float,
    bootstrap_value: Float[Array, " B"] | None = None,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Generalised advantage estimation (Schulman et al., 2016) with ``lax.scan``.

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = delta_t + gamma lam A_{t+1}``;
    returns ``R_t = A_t + V_t``. ``V`` after the last valid token is ``bootstrap_value``
    (0 = terminated) and ``A`` there is 0.

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` float32 and 0 at masked positions.
    """
    (rewards, values), m, boot = _token_inputs(mask, bootstrap_value, rewards, values)
    rewards = jnp.where(m, rewards, 0.0)
    values = jnp.where(m, values, 0.0)

    def step(carry, x):
        v_next, a_next = carry
        r, v, valid = x
        delta = r + gamma * v_next - v
        a = delta + gamma * lam * a_next
        carry = (jnp.where(valid, v, v_next), jnp.where(valid, a, a_next))
        return carry, jnp.where(valid, a, 0.0)

    init = (boot, jnp.zeros_like(boot))
    adv = _reverse_scan(step, init, (rewards, values, m))
    return adv, jnp.where(m, adv + values, 0.0)


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
    rewards = jnp.asarray(rewards, jnp.float32)
    if group_size < 2:
        raise ValueError(f"group baselines need group_size >= 2, got {group_size}")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be [N * G] with G = group_size = {group_size}, got {rewards.shape}"
        )
    return rewards.reshape(-1, group_size)  # [N, G]


def _centred(r: jax.Array) -> jax.Array:
    """``r - mean_g(r)`` per group, computed on offsets from the group's first reward.

    Subtracting ``r[:, :1]`` first makes a group of identical rewards give offsets of exactly 0
    (a float32 mean of ``G`` copies of ``c`` need not equal ``c``: for ``c = 123.456``, ``G = 3``
    the naive ``r - mean`` is ~8e-6, which the std normalisation then blows up to ~0.7).
    """
    d = r - r[:, :1]  # [N, G]; exactly 0 for identical rewards
    return d - jnp.mean(d, axis=-1, keepdims=True)


def group_advantages(
    rewards: Float[Array, " B"],
    *,
    group_size: int,
    scale_by_std: bool = True,
    std_ddof: int = 1,
    eps: float = 1e-6,
) -> Float[Array, " B"]:
    """Group-normalised advantages: GRPO (Shao et al., 2024) and Dr.GRPO (Liu et al., 2025).

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)``, or ``A_i = r_i - mean_g(r)`` with
    ``scale_by_std=False`` (Dr.GRPO removes the std to avoid the difficulty bias). ``std_ddof=1``
    is the unbiased std (as TRL). A group of identical rewards gets advantages of exactly 0.
    ``group_size`` must be >= 2 (``group_size=1`` raises ``ValueError``: a lone sample has no
    group baseline).
    """
    r = _groups(rewards, group_size)  # [N, G]
    centred = _centred(r)  # [N, G]
    if scale_by_std:
        var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (group_size - std_ddof)
        pos = var > 0
        std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)  # double where: no NaN grad
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: Float[Array, " B"], *, group_size: int) -> Float[Array, " B"]:
    """REINFORCE leave-one-out baseline (Kool et al., 2019; Ahmadian et al., 2024).

    ``A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean_g(r))``.
    ``group_size`` must be >= 2 (``group_size=1`` raises ``ValueError``: nothing to leave out).
    """
    r = _groups(rewards, group_size)
    d = r - r[:, :1]  # [N, G]; offsets keep identical rewards at exactly 0 (see _centred)
    loo = (jnp.sum(d, axis=-1, keepdims=True) - d) / (group_size - 1)
    return (d - loo).reshape(-1)


def reinforce_pp_advantages(
    token_rewards: Float[Array, "B T"],
    mask: Mask,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> Float[Array, "B T"]:
    """REINFORCE++ (Hu, 2025): discounted returns whitened over the *whole batch*.

    ``A_t = (G_t - mean_batch(G)) / sqrt(var_batch(G) + eps)``, statistics over every valid token
    of the batch, with the *population* variance ``mean((G - mean G)^2)`` (ddof=0, as the
    authors' OpenRLHF implementation whitens); ``token_rewards``
    usually holds ``-beta * KL_t`` per token plus the scalar reward on the last token. Under
    ``jax.jit`` on a sharded batch the statistics are global.
    """
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    return masked_whiten(returns, mask, eps=eps, unbiased=False)
