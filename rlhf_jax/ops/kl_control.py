"""KL-penalty coefficient controllers as pure state (a pytree) plus pure update functions.

* fixed: the coefficient never changes.
* adaptive (Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019, eq. 2):
  ``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``.

The state lives in the trainer's ``TrainState`` and is checkpointed with it, so a resumed run
continues with the same coefficient. ``KL_CONTROLLERS`` is the table configs choose from.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class KLControllerState(NamedTuple):
    """Current KL coefficient ``beta`` (a float32 scalar array)."""

    kl_coef: Float[Array, ""]


def kl_controller_init(kl_coef: float) -> KLControllerState:
    """Initial state with coefficient ``kl_coef`` (must be >= 0)."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    return KLControllerState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def fixed_kl_update(
    state: KLControllerState, *, observed_kl: jax.Array, n_steps: int | jax.Array, **_unused
) -> KLControllerState:
    """Fixed controller: returns ``state`` unchanged (``target``/``horizon`` are ignored)."""
    del observed_kl, n_steps
    return state


def adaptive_kl_update(
    state: KLControllerState,
    *,
    observed_kl: Float[Array, ""],
    n_steps: int | jax.Array,
    target: float,
    horizon: float,
) -> KLControllerState:
    """Proportional controller of Ziegler et al. (2019) driving the KL towards ``target``.

    ``e = clip(observed_kl / target - 1, -0.2, 0.2)``;
    ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``.

    >>> s = adaptive_kl_update(kl_controller_init(0.1), observed_kl=jnp.array(12.0),
    ...                        n_steps=100, target=6.0, horizon=1000.0)
    >>> round(float(s.kl_coef), 4)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 0.1)
    0.102
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
    err = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    err = jnp.where(jnp.isfinite(err), err, 0.0)  # a NaN KL must not poison the coefficient
    mult = 1.0 + err * jnp.asarray(n_steps, jnp.float32) / horizon
    return KLControllerState(kl_coef=state.kl_coef * mult)


KL_CONTROLLERS = {
    "fixed": fixed_kl_update,
    "adaptive": adaptive_kl_update,
}
