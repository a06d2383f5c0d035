"""Padding, packing, preference pairs and prompt batches: exact arrays, and the packing
invariants the model relies on (packed equals unpacked, per document)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.data import pack_token_batch, pad_token_batch, preference_batch, prompt_batch
from rlhf_jax.types import PreferenceBatch, PromptBatch, TokenBatch

T, F = True, False


def _assert_batch(batch: TokenBatch, **expected) -> None:
    assert isinstance(batch, TokenBatch)
    dtypes = {"tokens": np.int32, "loss_mask": np.bool_, "attention_mask": np.bool_,
              "segment_ids": np.int32, "positions": np.int32}
    for name, value in expected.items():
        got = getattr(batch, name)
        assert isinstance(got, np.ndarray) and got.dtype == dtypes[name], (name, got.dtype)
        np.testing.assert_array_equal(got, np.asarray(value), err_msg=name)


def test_pad_token_batch_hand():
    batch = pad_token_batch([([5, 6, 7], [0, 1, 1]), ([8], [1]), ([], [])], length=4, pad_id=9)
    _assert_batch(
        batch,
        tokens=[[5, 6, 7, 9], [8, 9, 9, 9], [9, 9, 9, 9]],
        loss_mask=[[F, T, T, F], [F, F, F, F], [F, F, F, F]],  # position 0 is never a target
        attention_mask=[[T, T, T, F], [T, F, F, F], [F, F, F, F]],
        segment_ids=[[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
        positions=[[0, 1, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("fn", [pad_token_batch, pack_token_batch])
def test_token_batch_errors(fn):
    with pytest.raises(ValueError, match="item 1 has 5 tokens, longer than length=4"):
        fn([([1], [1]), ([1, 2, 3, 4, 5], [1] * 5)], length=4, pad_id=0)
    with pytest.raises(ValueError, match="item 0: 2 ids but 1 target-mask entries"):
        fn([([1, 2], [1])], length=4, pad_id=0)
    with pytest.raises(ValueError, match="no items to batch"):
        fn([], length=4, pad_id=0)
    with pytest.raises(ValueError, match="length must be a positive int, got 0"):
        fn([([1], [1])], length=0, pad_id=0)


def test_pack_token_batch_hand():
    # Lengths 3, 5, 2, 4 into rows of 8, longest first: 5 -> row 0, 4 -> row 1, 3 -> row 0
    # (3 left), 2 -> row 1 (row 0 has 0 left).
    items = [([1, 2, 3], [0, 1, 1]), ([11, 12, 13, 14, 15], [0, 0, 1, 1, 1]), ([21, 22], [1, 1]),
             ([31, 32, 33, 34], [0, 1, 0, 1])]
    batch = pack_token_batch(items, length=8, pad_id=0)
    _assert_batch(
        batch,
        tokens=[[11, 12, 13, 14, 15, 1, 2, 3], [31, 32, 33, 34, 21, 22, 0, 0]],
        loss_mask=[[F, F, T, T, T, F, T, T], [F, T, F, T, F, T, F, F]],
        attention_mask=[[T] * 8, [T] * 6 + [F] * 2],
        segment_ids=[[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2, 0, 0]],
        positions=[[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]])
    padded = pack_token_batch(items, length=8, pad_id=0, num_rows=3)
    for name in TokenBatch._fields:
        np.testing.assert_array_equal(getattr(padded, name)[:2], getattr(batch, name))
    _assert_batch(TokenBatch(*(x[2:] for x in padded)), tokens=[[0] * 8], segment_ids=[[0] * 8],
                  attention_mask=[[F] * 8], loss_mask=[[F] * 8], positions=[[0] * 8])
    with pytest.raises(ValueError, match=r"4 sequences \(14 tokens\) need 2 packed rows of "
                                         r"length 8, more than num_rows=1"):
        pack_token_batch(items, length=8, pad_id=0, num_rows=1)
    with pytest.raises(ValueError, match="item 1 is empty"):
        pack_token_batch([([1], [1]), ([], [])], length=8, pad_id=0)


_packing_cases = st.integers(3, 16).flatmap(lambda length: st.tuples(
    st.just(length),
    st.lists(st.lists(st.booleans(), min_size=1, max_size=length), min_size=1, max_size=14)))


@given(_packing_cases)
def test_pack_token_batch_property(case):
    length, masks = case
    pad = 7
    # Document i has tokens 1000*i + 1 .. : each token names its document and its offset.
    items = [([1000 * i + j + 1 for j in range(len(m))], [int(b) for b in m])
             for i, m in enumerate(masks)]
    batch = pack_token_batch(items, length=length, pad_id=pad)
    again = pack_token_batch(items, length=length, pad_id=pad)
    for name in TokenBatch._fields:  # deterministic
        np.testing.assert_array_equal(getattr(batch, name), getattr(again, name))
    assert batch.tokens.shape[1] == length
    seen, loads = [], []
    for r in range(batch.tokens.shape[0]):
        seg = batch.segment_ids[r]
        real = seg > 0
        n_real = int(real.sum())
        assert n_real > 0 and real[:n_real].all(), "documents first, padding at the end"
        assert (batch.attention_mask[r] == real).all()
        assert (batch.tokens[r, ~real] == pad).all() and not batch.loss_mask[r, ~real].any()
        assert (batch.positions[r, ~real] == 0).all()
        loads.append(n_real)
        segments = list(dict.fromkeys(seg[real].tolist()))
        assert segments == list(range(1, len(segments) + 1)), "ids 1, 2, 3 ... in row order"
        for s in segments:
            where = np.flatnonzero(seg == s)
            assert (np.diff(where) == 1).all(), "a document is contiguous"
            doc = int(batch.tokens[r, where[0]]) // 1000
            ids, mask = items[doc]
            np.testing.assert_array_equal(batch.tokens[r, where], ids)
            np.testing.assert_array_equal(batch.positions[r, where], np.arange(len(ids)))
            np.testing.assert_array_equal(batch.loss_mask[r, where], [False] + mask[1:])
            # packed equals unpacked: the same document padded alone gives the same arrays
            alone = pad_token_batch([(ids, mask)], length=length, pad_id=pad)
            for name in ("tokens", "loss_mask", "positions"):
                np.testing.assert_array_equal(getattr(batch, name)[r, where],
                                              getattr(alone, name)[0, :len(ids)])
            seen.append(doc)
    assert sorted(seen) == list(range(len(items))), "every document exactly once"
    assert sum(loads) == sum(len(m) for m in masks), "real tokens preserved"
    assert max(loads) <= length
    # first fit: at most one row is half full or less (else its documents fit the other)
    assert sum(load <= length / 2 for load in loads) <= 1


def test_preference_batch_hand():
    pb = preference_batch([([1, 2], [3], [4, 5]), ([6], [7, 8], [9])], length=4, pad_id=0)
    assert isinstance(pb, PreferenceBatch)
    _assert_batch(pb.chosen, tokens=[[1, 2, 3, 0], [6, 7, 8, 0]],
                  loss_mask=[[F, F, T, F], [F, T, T, F]],
                  attention_mask=[[T, T, T, F], [T, T, T, F]],
                  segment_ids=[[1, 1, 1, 0], [1, 1, 1, 0]], positions=[[0, 1, 2, 0], [0, 1, 2, 0]])
    _assert_batch(pb.rejected, tokens=[[1, 2, 4, 5], [6, 9, 0, 0]],
                  loss_mask=[[F, F, T, T], [F, T, F, F]],
                  attention_mask=[[T, T, T, T], [T, T, F, F]],
                  segment_ids=[[1, 1, 1, 1], [1, 1, 0, 0]], positions=[[0, 1, 2, 3], [0, 1, 0, 0]])


def test_preference_batch_errors():
    with pytest.raises(ValueError, match="pair 1: prompt \\+ rejected is 5 tokens, longer than "
                                         "length=4"):
        preference_batch([([1], [2], [3]), ([1, 2], [3], [4, 5, 6])], length=4, pad_id=0)
    with pytest.raises(ValueError, match="pair 0: the chosen response is empty"):
        preference_batch([([1], [], [3])], length=4, pad_id=0)


def test_prompt_batch_hand_and_errors():
    pb = prompt_batch([[5, 6], [7, 8, 9, 10], [3]], length=4, pad_id=0)
    assert isinstance(pb, PromptBatch)
    assert pb.tokens.dtype == np.int32 and pb.mask.dtype == np.bool_
    np.testing.assert_array_equal(pb.tokens, [[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 3]])
    np.testing.assert_array_equal(pb.mask, [[F, F, T, T], [T, T, T, T], [F, F, F, T]])
    with pytest.raises(ValueError, match="prompt 1 has 5 tokens, longer than length=4"):
        prompt_batch([[1], [1, 2, 3, 4, 5]], length=4, pad_id=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        prompt_batch([[]], length=4, pad_id=0)


@given(st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=16), min_size=1, max_size=6))
def test_prompt_batch_matches_sampler_pad_prompts_property(prompts):
    from rlhf_jax.sampling import pad_prompts

    pb = prompt_batch(prompts, length=16, pad_id=3)
    tokens, mask = pad_prompts(prompts, pad_id=3, buckets=(16,))
    np.testing.assert_array_equal(pb.tokens, tokens)
    np.testing.assert_array_equal(pb.mask, mask)
