"""Shared test utilities: random inputs, NumPy references, finiteness and gradient checks."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax.test_util import check_grads  # noqa: F401  (re-exported for the tests)

EXTREME_LOG_RATIOS = [50.0, -50.0, 100.0, -100.0, float("inf"), -float("inf")]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_mask(r: np.random.Generator, b: int, t: int, *, p: float = 0.7,
                empty_rows: int = 0, single_rows: int = 0) -> np.ndarray:
    """Random 0/1 float32 mask ``[b, t]``; the first rows can be forced empty / single-token."""
    m = (r.random((b, t)) < p).astype(np.float32)
    for i in range(min(empty_rows, b)):
        m[i] = 0
    for i in range(empty_rows, min(empty_rows + single_rows, b)):
        m[i] = 0
        m[i, r.integers(t)] = 1
    return m


def right_padded_mask(r: np.random.Generator, b: int, t: int, min_len: int = 0) -> np.ndarray:
    lens = r.integers(min_len, t + 1, size=b)
    return (np.arange(t)[None, :] < lens[:, None]).astype(np.float32)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def assert_all_finite(tree, what: str = "value") -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.asarray(leaf)
        assert np.all(np.isfinite(arr)), f"non-finite {what} at {jax.tree_util.keystr(path)}: {arr}"


def assert_trees_close(actual, desired, *, rtol: float, atol: float) -> None:
    """``chex.assert_trees_all_close`` on float64 copies: the same tree structure (dict keys,
    tuple lengths), and every leaf within ``atol + rtol * |desired|``, compared in float64 as the
    NumPy references are."""
    as64 = functools.partial(jax.tree.map, lambda x: np.asarray(x, np.float64))
    chex.assert_trees_all_close(as64(actual), as64(desired), rtol=rtol, atol=atol)


def mask_strategy(b: int, t: int):
    """Hypothesis strategy for 0/1 masks of a fixed shape (fixed shapes avoid recompiles)."""
    return st.lists(st.lists(st.integers(0, 1), min_size=t, max_size=t),
                    min_size=b, max_size=b).map(lambda x: np.asarray(x, np.float32))


def float_array_strategy(shape, lo: float = -5.0, hi: float = 5.0):
    n = int(np.prod(shape))
    floats = st.floats(lo, hi, allow_nan=False, width=32, allow_subnormal=False)
    return st.lists(floats, min_size=n, max_size=n).map(
        lambda x: np.asarray(x, np.float32).reshape(shape))


def total_mean(out) -> jnp.ndarray:
    """``loss_sum / count`` of a ``(loss_sum, count, metrics)`` triple."""
    total, count = out[0], out[1]
    return total / jnp.maximum(count, 1.0)
