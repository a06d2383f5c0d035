"""Tests of EOS completion masks and last-token indices (rlhf_jax/ops/masks.py).

Integer / boolean outputs: hand cases, NumPy loops and properties (no gradient to check).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops.masks import completion_mask_from_eos, is_truncated, last_token_index
from tests.helpers import mask_strategy, rng

B, T = 4, 7


def _eq(a, b):
    np.testing.assert_array_equal(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64))


def _tokens_strategy(b=B, t=T, vocab=5):
    """Small vocabulary so EOS ids (0 and 1 below) appear often, sometimes never."""
    return st.lists(st.lists(st.integers(0, vocab - 1), min_size=t, max_size=t),
                    min_size=b, max_size=b).map(lambda x: np.asarray(x, np.int32))


def np_completion_mask(tokens, eos_ids, include_eos=True):
    eos = set([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    out = np.zeros(tokens.shape, bool)
    for i, row in enumerate(tokens):
        for j, tok in enumerate(row):
            if int(tok) in eos:
                out[i, j] = include_eos
                break
            out[i, j] = True
    return out


def np_is_truncated(tokens, eos_ids):
    eos = set([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    return np.array([not any(int(t) in eos for t in row) for row in tokens])


def np_last_token_index(mask):
    out = []
    for row in mask:
        last = 0
        for j, v in enumerate(row):
            if v:
                last = j
        out.append(last)
    return np.array(out)


# ------------------------------------------------------------------ completion_mask_from_eos
def test_completion_mask_from_eos_hand():
    tokens = jnp.array([[5, 2, 2, 2],   # pad == eos == 2: the first EOS stays, the rest is pad
                        [5, 6, 7, 8],   # no EOS: truncated, all valid
                        [2, 9, 9, 9],   # EOS first
                        [5, 3, 4, 2]])  # EOS id 3 (second of several)
    _eq(completion_mask_from_eos(tokens, eos_ids=2),
        [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    _eq(completion_mask_from_eos(tokens, eos_ids=[2, 3]),
        [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    _eq(completion_mask_from_eos(tokens, eos_ids=(3, 2), include_eos=False),
        [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert completion_mask_from_eos(tokens, eos_ids=2).dtype == jnp.bool_


@pytest.mark.parametrize("eos_ids", [0, [0, 1], (1, 4, 0)])
@pytest.mark.parametrize("include_eos", [True, False])
def test_completion_mask_from_eos_numpy_loops(eos_ids, include_eos):
    tokens = rng(0).integers(0, 6, size=(8, 9)).astype(np.int32)
    _eq(completion_mask_from_eos(tokens, eos_ids=eos_ids, include_eos=include_eos),
        np_completion_mask(tokens, eos_ids, include_eos))


@given(_tokens_strategy(), st.integers(0, 4))
def test_completion_mask_from_eos_property_prefix_and_tail_invariance(tokens, junk):
    m = np.asarray(completion_mask_from_eos(tokens, eos_ids=[0, 1]))
    assert np.all(np.diff(m.astype(int), axis=1) <= 0)  # a prefix: once 0, stays 0
    is_eos = np.isin(tokens, [0, 1])
    first = np.where(is_eos.any(1), is_eos.argmax(1), T - 1)
    _eq(m.sum(1), first + 1)  # runs up to and including the first EOS
    excl = np.asarray(completion_mask_from_eos(tokens, eos_ids=[0, 1], include_eos=False))
    _eq(excl, m & ~is_eos)
    # whatever comes after the first EOS (pad == eos or anything else) changes nothing
    changed = tokens.copy()
    for i in range(B):
        if is_eos[i].any():
            changed[i, first[i] + 1:] = junk
    _eq(completion_mask_from_eos(changed, eos_ids=[0, 1]), m)
    # the last completion token is the first EOS (or the last position when truncated)
    _eq(last_token_index(m), first)


# ------------------------------------------------------------------------------ is_truncated
def test_is_truncated_hand():
    tokens = jnp.array([[5, 2, 2], [5, 6, 7], [3, 9, 9]])
    _eq(is_truncated(tokens, eos_ids=2), [0, 1, 1])
    _eq(is_truncated(tokens, eos_ids=[2, 3]), [0, 1, 0])


@pytest.mark.parametrize("eos_ids", [0, [0, 1]])
def test_is_truncated_numpy_loops(eos_ids):
    tokens = rng(1).integers(0, 8, size=(10, 6)).astype(np.int32)
    _eq(is_truncated(tokens, eos_ids=eos_ids), np_is_truncated(tokens, eos_ids))


@given(_tokens_strategy())
def test_is_truncated_property_consistent_with_mask(tokens):
    trunc = np.asarray(is_truncated(tokens, eos_ids=[0, 1]))
    excl = np.asarray(completion_mask_from_eos(tokens, eos_ids=[0, 1], include_eos=False))
    _eq(trunc, excl.all(1))  # truncated iff no EOS ends the row
    # more EOS ids can only end more rows
    assert np.all(np.asarray(is_truncated(tokens, eos_ids=[0, 1, 2])) <= trunc)


# -------------------------------------------------------------------------- last_token_index
def test_last_token_index_hand():
    mask = jnp.array([[0, 0, 1, 1],   # left padded -> 3
                      [1, 1, 0, 0],   # right padded -> 1
                      [0, 0, 0, 0],   # empty -> 0
                      [1, 0, 1, 0]])  # holes -> 2
    _eq(last_token_index(mask), [3, 1, 0, 2])
    _eq(last_token_index(mask.astype(bool)), [3, 1, 0, 2])
    _eq(last_token_index(mask.astype(jnp.float32)), [3, 1, 0, 2])
    assert last_token_index(mask).dtype == jnp.int32


def test_last_token_index_numpy_loops():
    mask = (rng(2).random((12, 9)) < 0.3).astype(np.float32)
    mask[0] = 0
    _eq(last_token_index(mask), np_last_token_index(mask))


@given(st.lists(st.integers(0, T), min_size=B, max_size=B), mask_strategy(B, T))
def test_last_token_index_property_padding_sides(lengths, holes):
    lens = np.asarray(lengths)
    right = np.arange(T)[None, :] < lens[:, None]
    left = np.arange(T)[None, :] >= (T - lens)[:, None]
    _eq(last_token_index(right), np.maximum(lens - 1, 0))
    _eq(last_token_index(left), np.where(lens > 0, T - 1, 0))
    # any mask: the position is valid (or the row is empty) and nothing after it is valid
    idx = np.asarray(last_token_index(holes))
    for i in range(B):
        assert holes[i, idx[i]] == 1 or holes[i].sum() == 0
        assert holes[i, idx[i] + 1:].sum() == 0
