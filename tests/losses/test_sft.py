"""Tests of ``sft_loss`` (rlhf_jax/losses/sft.py): hand cases, NumPy loops, properties, grads.

``sft_loss`` returns ``(loss_sum, count, {"nll": Mean})`` with the per-token NLL ``-logp``
aggregated by one of the four ``ops.AGGREGATIONS`` modes; ``metrics["nll"]`` is always the
token-mean NLL.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.losses import sft_loss
from rlhf_jax.ops.aggregation import AGGREGATIONS
from rlhf_jax.ops.stats import compute_metrics, merge_metrics
from tests.helpers import (
    assert_all_finite,
    check_grads,
    float_array_strategy,
    mask_strategy,
    random_mask,
    rng,
)

B, T = 4, 5  # fixed shapes of the property tests (one compile per shape)
MODES = sorted(AGGREGATIONS)
NAN, INF = float("nan"), float("inf")


def _allclose(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _nll_metric(out) -> float:
    return float(compute_metrics(out[2])["nll"])


@functools.partial(jax.jit, static_argnames=("aggregation", "max_tokens"))
def _sft(logp, mask, aggregation="token_mean", max_tokens=None):
    return sft_loss(logp, mask, aggregation=aggregation, max_tokens=max_tokens)


def np_sft(logp, mask, mode, max_tokens=None):
    """Plain float64 loops: (sum, count, token-mean nll)."""
    b, t = logp.shape
    norm = float(t if max_tokens is None else max_tokens)
    total, count, nll_sum, n_tok = 0.0, 0.0, 0.0, 0.0
    for i in range(b):
        row, n = 0.0, 0
        for j in range(t):
            if mask[i, j]:
                row += -float(logp[i, j])
                n += 1
        nll_sum += row
        n_tok += n
        if mode == "token_mean":
            total += row
            count += n
        elif n > 0:
            count += 1
            total += {"seq_mean_token_mean": row / max(n, 1), "seq_mean_token_sum": row,
                      "seq_mean_token_sum_norm": row / norm}[mode]
    return total, count, nll_sum / n_tok if n_tok else 0.0


# ----------------------------------------------------------------------------------------- hand
LOGP = np.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], np.float32)
MASK = np.array([[1, 1, 0], [1, 0, 0]], np.float32)


@pytest.mark.parametrize("mode,total,count", [
    ("token_mean", 7.0, 3.0),               # (1 + 2) + 4 = 7 over 3 tokens
    ("seq_mean_token_mean", 5.5, 2.0),      # (1 + 2) / 2 + 4 / 1 = 1.5 + 4 = 5.5 over 2 rows
    ("seq_mean_token_sum", 7.0, 2.0),       # 3 + 4 = 7 over 2 rows
    ("seq_mean_token_sum_norm", 7.0 / 3.0, 2.0),  # (3 + 4) / T, T = 3
])
def test_sft_loss_hand_two_rows(mode, total, count):
    out = sft_loss(LOGP, MASK, aggregation=mode)
    _allclose(out[0], total)
    assert float(out[1]) == count
    _allclose(_nll_metric(out), 7.0 / 3.0)  # token-mean NLL whatever the mode


def test_sft_loss_hand_max_tokens_and_empty_row():
    # Dr.GRPO-style constant: (3 + 4) / 14 = 0.5; an extra empty row adds nothing and is not counted
    logp = np.concatenate([LOGP, np.full((1, 3), -9.0, np.float32)])
    mask = np.concatenate([MASK, np.zeros((1, 3), np.float32)])
    out = sft_loss(logp, mask, aggregation="seq_mean_token_sum_norm", max_tokens=14)
    _allclose(out[0], 0.5)
    assert float(out[1]) == 2.0
    # mask=None: every token counts; 21 / 6 = 3.5
    out = sft_loss(LOGP, None)
    _allclose(out[0], 21.0)
    assert float(out[1]) == 6.0
    _allclose(_nll_metric(out), 3.5)


def test_sft_loss_hand_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="unknown aggregation"):
        sft_loss(LOGP, MASK, aggregation="mean")


# ---------------------------------------------------------------------------------------- numpy
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sft_loss_numpy(mode, seed):
    r = rng(seed)
    logp = -r.exponential(2.0, (6, 7)).astype(np.float32)
    mask = random_mask(r, 6, 7, empty_rows=1, single_rows=1)
    out = sft_loss(logp, mask, aggregation=mode, max_tokens=11)
    total, count, nll = np_sft(logp, mask, mode, max_tokens=11)
    _allclose(out[0], total)
    assert float(out[1]) == count
    _allclose(_nll_metric(out), nll)


# ------------------------------------------------------------------------------------- property
logp_st = float_array_strategy((B, T), -10.0, 0.0)


@given(logp=logp_st, mask=mask_strategy(B, T), k=st.integers(0, B))
def test_sft_loss_property_micro_batched_equals_whole(logp, mask, k):
    for mode in MODES:
        whole = _sft(logp, mask, aggregation=mode)
        a = sft_loss(logp[:k], mask[:k], aggregation=mode, max_tokens=T)
        b = sft_loss(logp[k:], mask[k:], aggregation=mode, max_tokens=T)
        _allclose(a[0] + b[0], whole[0])
        assert float(a[1] + b[1]) == float(whole[1])
        merged = compute_metrics(merge_metrics(a[2], b[2]))
        _allclose(merged["nll"], _nll_metric(whole))


@given(logp=logp_st, mask=mask_strategy(B, T - 2),
       junk=st.sampled_from([NAN, -INF, INF, -1e30, 0.0]))
def test_sft_loss_property_mask_equals_slice(logp, mask, junk):
    """Masked tokens may hold anything; padding columns can be sliced off (fixed max_tokens)."""
    full_mask = np.concatenate([mask, np.zeros((B, 2), np.float32)], axis=1)
    dirty = np.where(full_mask > 0, logp, junk).astype(np.float32)
    for mode in MODES:
        out = _sft(dirty, full_mask, aggregation=mode, max_tokens=T)
        ref = _sft(logp[:, :T - 2], mask, aggregation=mode, max_tokens=T)
        _allclose(out[0], ref[0])
        assert float(out[1]) == float(ref[1])
        _allclose(_nll_metric(out), _nll_metric(ref))
        g = jax.grad(lambda x: sft_loss(x, full_mask, aggregation=mode)[0])(dirty)
        assert_all_finite(g, "gradient")
        assert np.all(np.asarray(g)[full_mask == 0] == 0.0)


@given(logp=logp_st, mask=mask_strategy(B, T), perm=st.permutations(list(range(B))))
def test_sft_loss_property_row_permutation_invariant(logp, mask, perm):
    for mode in MODES:
        a = _sft(logp, mask, aggregation=mode)
        b = _sft(logp[perm], mask[perm], aggregation=mode)
        _allclose(a[0], b[0])
        assert float(a[1]) == float(b[1])


@given(logp=logp_st, mask=mask_strategy(B, T))
def test_sft_loss_property_nonnegative_and_nll_bounds(logp, mask):
    """NLL of log-probs <= 0 is >= 0; the token-mean NLL lies between the min and max NLL."""
    out = _sft(logp, mask)
    assert float(out[0]) >= 0.0
    valid = -logp[mask > 0].astype(np.float64)
    nll = _nll_metric(out)
    if valid.size:
        assert valid.min() - 1e-5 <= nll <= valid.max() + 1e-5
    else:
        assert nll == 0.0 and float(out[0]) == 0.0 and float(out[1]) == 0.0


def test_sft_loss_property_empty_and_single_masks():
    logp = -rng(5).exponential(1.0, (3, 4)).astype(np.float32)
    for mode in MODES:
        empty = np.zeros((3, 4), np.float32)
        out = sft_loss(logp, empty, aggregation=mode)
        assert float(out[0]) == 0.0 and float(out[1]) == 0.0 and _nll_metric(out) == 0.0
        g = jax.grad(lambda x: sft_loss(x, empty, aggregation=mode)[0])(logp)
        assert np.all(np.asarray(g) == 0.0)
        single = np.zeros((3, 4), np.float32)
        single[1, 2] = 1.0
        out = sft_loss(logp, single, aggregation=mode)
        assert float(out[1]) == 1.0
        _allclose(_nll_metric(out), -logp[1, 2])
        g = jax.grad(lambda x: sft_loss(x, single, aggregation=mode)[0])(logp)
        assert_all_finite(g, "gradient")


# ----------------------------------------------------------------------------------------- grad
@pytest.mark.parametrize("mode", MODES)
def test_sft_loss_grad_check_grads(mode):
    r = rng(2)
    logp = jnp.asarray(-r.exponential(1.0, (3, 5)), jnp.float32)
    mask = random_mask(r, 3, 5, single_rows=1)
    f = lambda x: sft_loss(x, mask, aggregation=mode)[0]  # noqa: E731
    check_grads(f, (logp,), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_sft_loss_grad_analytic():
    """d sum / d logp = -m (token sums), -m / n_i (seq_mean_token_mean), -m / max_tokens (norm)."""
    r = rng(3)
    logp = jnp.asarray(-r.exponential(1.0, (4, 6)), jnp.float32)
    mask = random_mask(r, 4, 6, empty_rows=1, single_rows=1)
    n = np.maximum(mask.sum(-1, keepdims=True), 1.0)
    want = {"token_mean": -mask, "seq_mean_token_sum": -mask,
            "seq_mean_token_mean": -mask / n, "seq_mean_token_sum_norm": -mask / 8.0}
    for mode, expected in want.items():
        g = jax.grad(lambda x: sft_loss(x, mask, aggregation=mode, max_tokens=8)[0])(logp)
        _allclose(g, expected, atol=1e-6)
    # gradient of the mean loss (sum / count) under token_mean: -1/count on valid tokens
    g = jax.grad(lambda x: (lambda o: o[0] / o[1])(sft_loss(x, mask)))(logp)
    _allclose(g, -mask / mask.sum(), atol=1e-7)
