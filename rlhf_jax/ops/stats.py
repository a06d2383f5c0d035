"""Metric accumulators that stay exact under micro-batching and sharding.

Every loss returns its metrics as a dict of these small pytrees instead of means. The trainer
merges the dicts of several micro-batches (``merge_metrics``) and turns them into numbers once
(``compute_metrics``), so a metric's value never depends on how a batch was split (the loss-scale
bug class of STYLE point 5 applies to metrics too).

>>> m = {"acc": Mean(total=jnp.array(3.0), count=jnp.array(4.0))}
>>> float(compute_metrics(merge_metrics(m, m))["acc"])
0.75
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp


class Mean(NamedTuple):
    """A running mean, ``total / count`` (0 when ``count`` is 0). Merges by addition."""

    total: jax.Array
    count: jax.Array

    def merge(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.count + other.count)

    def compute(self) -> jax.Array:
        return self.total / jnp.maximum(self.count, 1e-12) * (self.count > 0)


class Max(NamedTuple):
    """A running maximum. Merges by ``max``; the empty accumulator holds ``-inf`` (the identity)
    and computes to 0, like an empty ``Mean``, so an all-masked batch logs a finite number."""

    value: jax.Array

    def merge(self, other: "Max") -> "Max":
        return Max(jnp.maximum(self.value, other.value))

    def compute(self) -> jax.Array:
        return jnp.where(self.value == -jnp.inf, 0.0, self.value)


class Min(NamedTuple):
    """A running minimum. Merges by ``min``; the empty accumulator holds ``+inf`` (the identity)
    and computes to 0, like an empty ``Mean``."""

    value: jax.Array

    def merge(self, other: "Min") -> "Min":
        return Min(jnp.minimum(self.value, other.value))

    def compute(self) -> jax.Array:
        return jnp.where(self.value == jnp.inf, 0.0, self.value)


class ExplainedVariance(NamedTuple):
    """Sufficient statistics for ``1 - Var[y - y_hat] / Var[y]``; merges by addition.

    ``n`` tokens, sums of targets ``y`` and of their squares, sums of residuals ``e = y - y_hat``
    and of their squares. ``compute`` returns 0 when ``Var[y]`` is 0 (nothing to explain).
    """

    n: jax.Array
    sum_y: jax.Array
    sum_y2: jax.Array
    sum_e: jax.Array
    sum_e2: jax.Array

    def merge(self, other: "ExplainedVariance") -> "ExplainedVariance":
        return ExplainedVariance(*(a + b for a, b in zip(self, other)))

    def compute(self) -> jax.Array:
        n = jnp.maximum(self.n, 1.0)
        var_y = self.sum_y2 / n - (self.sum_y / n) ** 2
        var_e = self.sum_e2 / n - (self.sum_e / n) ** 2
        ok = var_y > 1e-12
        return jnp.where(ok, 1.0 - var_e / jnp.where(ok, var_y, 1.0), 0.0)


Stat = Mean | Max | Min | ExplainedVariance
Metrics = Mapping[str, Stat]


def merge_metrics(a: Metrics, b: Metrics) -> dict[str, Stat]:
    """Merge two metric dicts with the same keys (e.g. from two micro-batches)."""
    if a.keys() != b.keys():
        raise ValueError(f"metric keys differ: {sorted(set(a) ^ set(b))}")
    return {k: a[k].merge(b[k]) for k in a}


def compute_metrics(metrics: Metrics) -> dict[str, jax.Array]:
    """Turn accumulated statistics into scalar values."""
    return {k: v.compute() for k, v in metrics.items()}
