"""Tests of rlhf_jax/ops/aggregation.py: every mode returns an exact ``(sum, count)`` pair.

The key property (RELIABILITY "Numerics"): splitting a batch into micro-batches, adding their
sums and counts and dividing once with ``safe_divide`` equals the whole batch's result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops import (
    AGGREGATIONS,
    aggregate_loss,
    safe_divide,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from tests.helpers import (
    assert_all_finite,
    check_grads,
    float_array_strategy,
    mask_strategy,
    random_mask,
    rng,
)

B, T = 6, 5  # fixed shapes for the property tests
NAN, INF = float("nan"), float("inf")
MODES = sorted(AGGREGATIONS)
FNS = {"token_mean": token_mean, "seq_mean_token_mean": seq_mean_token_mean,
       "seq_mean_token_sum": seq_mean_token_sum, "seq_mean_token_sum_norm": seq_mean_token_sum_norm}


def _close(a, b, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def np_aggregate(loss, mask, mode, max_tokens=None):
    """Plain float64 loops: ``(sum, count)`` of one mode."""
    loss, mask = np.asarray(loss, np.float64), np.asarray(mask) > 0
    b_, t_ = loss.shape
    norm = float(t_ if max_tokens is None else max_tokens)
    total, count = 0.0, 0.0
    for b in range(b_):
        s, n = 0.0, 0
        for t in range(t_):
            if mask[b, t]:
                s += loss[b, t]
                n += 1
        if mode == "token_mean":
            total, count = total + s, count + n
        elif n:
            total += {"seq_mean_token_mean": s / n, "seq_mean_token_sum": s,
                      "seq_mean_token_sum_norm": s / norm}[mode]
            count += 1
    return total, count


# Hand case shared by the four modes:
#   loss = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], mask = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]
#   token_mean:               sum 1 + 2 + 4 = 7, count 3 tokens -> 7/3
#   seq_mean_token_mean:      row means 1.5, 4 (empty row not counted) -> sum 5.5, count 2
#   seq_mean_token_sum:       sum 7, count 2 rows
#   seq_mean_token_sum_norm:  sum 7 / T = 7/3 (or 7/4 with max_tokens 4), count 2
HAND_LOSS = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
HAND_MASK = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
HAND = {"token_mean": (7.0, 3.0), "seq_mean_token_mean": (5.5, 2.0),
        "seq_mean_token_sum": (7.0, 2.0), "seq_mean_token_sum_norm": (7.0 / 3.0, 2.0)}


def _check_hand(mode, fn):
    s, c = fn(HAND_LOSS, HAND_MASK)
    _close(s, HAND[mode][0], atol=0)
    assert float(c) == HAND[mode][1]
    # garbage at masked positions (inf, NaN) changes nothing
    s2, c2 = fn(jnp.where(HAND_MASK > 0, HAND_LOSS, NAN).at[0, 2].set(INF), HAND_MASK)
    assert float(s2) == float(s) and float(c2) == float(c)


def _check_numpy(mode, fn, seed):
    r = rng(seed)
    for b, t in ((4, 7), (1, 3), (9, 2)):
        m = random_mask(r, b, t, p=0.6, empty_rows=1, single_rows=1)
        loss = r.normal(size=(b, t)).astype(np.float32)
        for max_tokens in (None, 11):
            s, c = fn(loss, m, max_tokens=max_tokens)
            es, ec = np_aggregate(loss, m, mode, max_tokens)
            _close(s, es, rtol=1e-5, atol=1e-5)
            assert float(c) == ec


def _split_points():
    """Between 0 and 3 cut points in 1..B-1 (k = 1..4 micro-batches, uneven allowed)."""
    return st.lists(st.integers(1, B - 1), max_size=3, unique=True).map(sorted)


def _check_microbatch(fn, mask, loss, cuts):
    whole = safe_divide(*fn(loss, mask))
    total, count = jnp.zeros(()), jnp.zeros(())
    for lo, hi in zip([0] + cuts, cuts + [B]):
        s, c = fn(loss[lo:hi], mask[lo:hi])
        total, count = total + s, count + c
    _, whole_c = fn(loss, mask)
    assert float(count) == float(whole_c)
    # float32 sums in a different order: 1e-6 relative to the size of the summed terms
    scale = float(safe_divide(*fn(np.abs(loss), mask)))
    _close(safe_divide(total, count), whole, rtol=1e-6, atol=1e-6 * (1.0 + scale))


def _check_mask_equals_slice(fn, loss, lengths, junk):
    # Right padding with junk: the sum of per-row results on the valid slices equals the whole.
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
    padded = np.where(mask > 0, loss, junk).astype(np.float32)
    s, c = fn(padded, mask, max_tokens=T)
    total, count = 0.0, 0.0
    for b, n in enumerate(lengths):
        if n:
            sb, cb = fn(loss[b:b + 1, :n], np.ones((1, n)), max_tokens=T)
            total, count = total + float(sb), count + float(cb)
    assert float(c) == count
    _close(s, total, rtol=1e-6, atol=1e-5)


def _check_empty(fn):
    # Empty rows are not counted; an all-empty batch is (0, 0) and divides to 0 with a finite
    # (zero) gradient even when the masked losses are inf/NaN.
    loss = jnp.array([[1.0, INF], [NAN, -INF]])
    s, c = fn(loss, jnp.zeros((2, 2)))
    assert float(s) == 0.0 and float(c) == 0.0
    val, g = jax.value_and_grad(lambda x: safe_divide(*fn(x, jnp.zeros((2, 2)))))(loss)
    assert float(val) == 0.0
    np.testing.assert_array_equal(np.asarray(g), np.zeros((2, 2)))
    m = jnp.array([[1, 0], [0, 0]])
    s1, c1 = fn(jnp.array([[3.0, 9.0], [5.0, 7.0]]), m)
    s2, c2 = fn(jnp.array([[3.0, 9.0], [5.0, 7.0], [1.0, 1.0]]),
                jnp.array([[1, 0], [0, 0], [0, 0]]))
    assert (float(s1), float(c1)) == (float(s2), float(c2))


def _analytic_grad(mode, mask, max_tokens=None):
    """d safe_divide(sum, count) / d loss in float64."""
    m = np.asarray(mask, np.float64)
    n_tok = m.sum(-1, keepdims=True)
    rows = float((n_tok > 0).sum())
    if mode == "token_mean":
        return m / max(m.sum(), 1.0)
    if mode == "seq_mean_token_mean":
        return m / np.maximum(n_tok, 1.0) / max(rows, 1.0)
    if mode == "seq_mean_token_sum":
        return m / max(rows, 1.0)
    return m / float(m.shape[-1] if max_tokens is None else max_tokens) / max(rows, 1.0)


def _check_grad(mode, fn, seed):
    r = rng(seed)
    m = random_mask(r, 4, 5, p=0.6, empty_rows=1, single_rows=1)
    loss = jnp.asarray(r.normal(size=(4, 5)), jnp.float32)
    f = lambda x: safe_divide(*fn(jnp.square(x) + x, m))  # noqa: E731
    check_grads(f, (loss,), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    g = jax.grad(lambda x: safe_divide(*fn(x, m)))(jnp.where(m > 0, loss, INF))
    assert_all_finite(g, "gradient")
    _close(g, _analytic_grad(mode, m), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ one block per mode


def test_token_mean_hand():
    _check_hand("token_mean", token_mean)


def test_token_mean_numpy():
    _check_numpy("token_mean", token_mean, 1)


@given(mask=mask_strategy(B, T), loss=float_array_strategy((B, T)), cuts=_split_points())
def test_token_mean_property_microbatched_equals_whole(mask, loss, cuts):
    _check_microbatch(token_mean, mask, loss, cuts)


@given(loss=float_array_strategy((B, T)), lengths=st.lists(st.integers(0, T), min_size=B,
       max_size=B), junk=st.sampled_from([0.0, 1e30, INF, NAN]))
def test_token_mean_property_mask_equals_slice(loss, lengths, junk):
    _check_mask_equals_slice(token_mean, loss, lengths, junk)


def test_token_mean_property_empty():
    _check_empty(token_mean)


def test_token_mean_grad():
    _check_grad("token_mean", token_mean, 2)


def test_seq_mean_token_mean_hand():
    _check_hand("seq_mean_token_mean", seq_mean_token_mean)


def test_seq_mean_token_mean_numpy():
    _check_numpy("seq_mean_token_mean", seq_mean_token_mean, 3)


@given(mask=mask_strategy(B, T), loss=float_array_strategy((B, T)), cuts=_split_points())
def test_seq_mean_token_mean_property_microbatched_equals_whole(mask, loss, cuts):
    _check_microbatch(seq_mean_token_mean, mask, loss, cuts)


@given(loss=float_array_strategy((B, T)), lengths=st.lists(st.integers(0, T), min_size=B,
       max_size=B), junk=st.sampled_from([0.0, 1e30, INF, NAN]))
def test_seq_mean_token_mean_property_mask_equals_slice(loss, lengths, junk):
    _check_mask_equals_slice(seq_mean_token_mean, loss, lengths, junk)


def test_seq_mean_token_mean_property_empty():
    _check_empty(seq_mean_token_mean)


def test_seq_mean_token_mean_grad():
    _check_grad("seq_mean_token_mean", seq_mean_token_mean, 4)


def test_seq_mean_token_sum_hand():
    _check_hand("seq_mean_token_sum", seq_mean_token_sum)


def test_seq_mean_token_sum_numpy():
    _check_numpy("seq_mean_token_sum", seq_mean_token_sum, 5)


@given(mask=mask_strategy(B, T), loss=float_array_strategy((B, T)), cuts=_split_points())
def test_seq_mean_token_sum_property_microbatched_equals_whole(mask, loss, cuts):
    _check_microbatch(seq_mean_token_sum, mask, loss, cuts)


@given(loss=float_array_strategy((B, T)), lengths=st.lists(st.integers(0, T), min_size=B,
       max_size=B), junk=st.sampled_from([0.0, 1e30, INF, NAN]))
def test_seq_mean_token_sum_property_mask_equals_slice(loss, lengths, junk):
    _check_mask_equals_slice(seq_mean_token_sum, loss, lengths, junk)


def test_seq_mean_token_sum_property_empty():
    _check_empty(seq_mean_token_sum)


def test_seq_mean_token_sum_grad():
    _check_grad("seq_mean_token_sum", seq_mean_token_sum, 6)


def test_seq_mean_token_sum_norm_hand():
    _check_hand("seq_mean_token_sum_norm", seq_mean_token_sum_norm)
    s, c = seq_mean_token_sum_norm(HAND_LOSS, HAND_MASK, max_tokens=4)  # 7 / 4 = 1.75
    assert (float(s), float(c)) == (1.75, 2.0)


def test_seq_mean_token_sum_norm_numpy():
    _check_numpy("seq_mean_token_sum_norm", seq_mean_token_sum_norm, 7)


@given(mask=mask_strategy(B, T), loss=float_array_strategy((B, T)), cuts=_split_points())
def test_seq_mean_token_sum_norm_property_microbatched_equals_whole(mask, loss, cuts):
    _check_microbatch(seq_mean_token_sum_norm, mask, loss, cuts)


@given(loss=float_array_strategy((B, T)), lengths=st.lists(st.integers(0, T), min_size=B,
       max_size=B), junk=st.sampled_from([0.0, 1e30, INF, NAN]))
def test_seq_mean_token_sum_norm_property_mask_equals_slice(loss, lengths, junk):
    _check_mask_equals_slice(seq_mean_token_sum_norm, loss, lengths, junk)


def test_seq_mean_token_sum_norm_property_empty_and_bad_max_tokens():
    _check_empty(seq_mean_token_sum_norm)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_tokens must be > 0"):
            seq_mean_token_sum_norm(HAND_LOSS, HAND_MASK, max_tokens=bad)


def test_seq_mean_token_sum_norm_grad():
    _check_grad("seq_mean_token_sum_norm", seq_mean_token_sum_norm, 8)


# ------------------------------------------------------------------ aggregate_loss


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_hand(mode):
    _check_hand(mode, lambda x, m, **kw: aggregate_loss(x, m, mode=mode, **kw))


def test_aggregate_loss_hand_broadcast_mask():
    # A [B, 1] mask broadcasts over T: rows 0 and 2 valid, loss rows sum to 6 and 24 -> 30 / 6.
    s, c = aggregate_loss(HAND_LOSS, jnp.array([[1], [0], [1]]), mode="token_mean")
    assert (float(s), float(c)) == (30.0, 6.0)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_numpy(mode):
    _check_numpy(mode, lambda x, m, **kw: aggregate_loss(x, m, mode=mode, **kw), 9)


@given(mask=mask_strategy(B, T), loss=float_array_strategy((B, T)), cuts=_split_points(),
       mode=st.sampled_from(MODES))
def test_aggregate_loss_property_microbatched_equals_whole(mask, loss, cuts, mode):
    fn = lambda x, m: aggregate_loss(x, m, mode=mode)  # noqa: E731
    _check_microbatch(fn, mask, loss, cuts)
    s, c = fn(loss, mask)
    es, ec = FNS[mode](loss, mask)
    assert float(s) == float(es) and float(c) == float(ec)  # the table dispatches, nothing more


def test_aggregate_loss_property_unknown_mode_lists_choices():
    with pytest.raises(ValueError) as e:
        aggregate_loss(HAND_LOSS, HAND_MASK, mode="seq_mean")
    msg = str(e.value)
    assert "'seq_mean'" in msg and all(m in msg for m in MODES)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_loss_grad(mode):
    _check_grad(mode, lambda x, m, **kw: aggregate_loss(x, m, mode=mode, **kw), 10)


# ------------------------------------------------------------------ safe_divide


def test_safe_divide_hand():
    # 7 / 3 = 2.333333; 1 / 0 -> 0 (not inf); 0 / 0 -> 0 (not NaN); -4 / 2 = -2.
    out = safe_divide(jnp.array([7.0, 1.0, 0.0, -4.0]), jnp.array([3.0, 0.0, 0.0, 2.0]))
    _close(out, [7 / 3, 0.0, 0.0, -2.0], atol=0)


def test_safe_divide_numpy():
    r = rng(11)
    total = r.normal(size=50).astype(np.float32)
    count = r.integers(0, 4, size=50).astype(np.float32)
    expected = [t / c if c > 0 else 0.0 for t, c in zip(total.astype(float), count.astype(float))]
    _close(safe_divide(total, count), expected, rtol=1e-6, atol=0)


@given(total=float_array_strategy((8,), -1e6, 1e6),
       count=st.lists(st.integers(0, 5), min_size=8, max_size=8))
def test_safe_divide_property(total, count):
    count = np.asarray(count, np.float32)
    out = np.asarray(safe_divide(total, count))
    assert np.all(out[count == 0] == 0.0)
    # XLA on CPU flushes subnormals to zero, hence the tiny atol
    _close(out[count > 0], (total / np.where(count > 0, count, 1))[count > 0], rtol=1e-7,
           atol=1e-30)


def test_safe_divide_grad():
    t, c = jnp.array([7.0, 1.0, -4.0]), jnp.array([3.0, 0.0, 2.0])
    check_grads(lambda a, b: jnp.sum(safe_divide(a, b + jnp.array([0.0, 0.0, 0.0]))),
                (t, jnp.array([3.0, 1.5, 2.0])), order=1, modes=["rev"], eps=1e-3, atol=1e-2,
                rtol=1e-2)
    gt, gc = jax.grad(lambda a, b: jnp.sum(safe_divide(a, b)), argnums=(0, 1))(t, c)
    # d(t/c)/dt = 1/c, d(t/c)/dc = -t/c^2; where c = 0 both are 0 (and finite).
    _close(gt, [1 / 3, 0.0, 0.5], atol=1e-7)
    _close(gc, [-7 / 9, 0.0, 1.0], atol=1e-6)
