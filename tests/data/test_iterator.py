"""BatchIterator (RELIABILITY: exact resume; no repeated or skipped data across a restart,
including across epoch boundaries)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.data import BatchIterator, pad_token_batch
from rlhf_jax.types import TokenBatch


def _ids(batch) -> list[int]:
    return batch["x"].tolist()


def _data(n: int) -> dict:
    return {"x": np.arange(n), "y": (np.arange(n) * 10, np.arange(2 * n).reshape(n, 2))}


def test_unshuffled_order_and_state_hand():
    it = BatchIterator(_data(5), batch_size=2, seed=3, shuffle=False)
    assert it.batches_per_epoch == 2 and it.epoch == 0
    assert _ids(it.next()) == [0, 1]
    assert it.state() == {"epoch": 0, "index": 2, "seed": 3, "batches": 1, "num_examples": 5}
    assert _ids(it.next()) == [2, 3]  # example 4 is the dropped tail
    assert it.state() == {"epoch": 1, "index": 0, "seed": 3, "batches": 2, "num_examples": 5}
    assert it.epoch == 1
    assert _ids(next(it)) == [0, 1]


def test_shuffled_order_is_the_documented_permutation():
    seed, n, b = 11, 7, 3
    it = BatchIterator(_data(n), batch_size=b, seed=seed)
    expected = []
    for e in range(3):
        perm = np.random.default_rng([seed, e]).permutation(n)
        expected += [perm[0:3].tolist(), perm[3:6].tolist()]
    assert [_ids(it.next()) for _ in range(6)] == expected
    assert expected[0] != expected[2]  # epochs are shuffled differently (for this seed)


def test_batch_keeps_structure_and_rows_stay_aligned():
    tb = pad_token_batch([([i + 1] * (i % 3 + 1), [1] * (i % 3 + 1)) for i in range(6)],
                         length=4, pad_id=0)
    data = (tb, {"reward": np.arange(6, dtype=np.float32) * 0.5})
    it = BatchIterator(data, batch_size=4, seed=0)
    batch, extra = it.next()
    assert isinstance(batch, TokenBatch) and set(extra) == {"reward"}
    rows = batch.tokens[:, 0] - 1  # the example index each row came from
    assert batch.tokens.shape == (4, 4) and batch.tokens.dtype == np.int32
    np.testing.assert_array_equal(rows, np.random.default_rng([0, 0]).permutation(6)[:4])
    np.testing.assert_array_equal(extra["reward"], rows * 0.5)
    np.testing.assert_array_equal(batch.positions, tb.positions[rows])
    np.testing.assert_array_equal(batch.loss_mask, tb.loss_mask[rows])


def test_errors():
    with pytest.raises(ValueError, match="the dataset has 3 examples, fewer than batch_size=4"):
        BatchIterator(_data(3), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="same leading axis N"):
        BatchIterator({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        BatchIterator(_data(3), batch_size=1, seed=-1)
    it = BatchIterator(_data(6), batch_size=2, seed=1)
    state = it.state()
    with pytest.raises(ValueError, match="saved with seed=1 but this iterator has seed=2"):
        BatchIterator(_data(6), batch_size=2, seed=2).restore(state)
    with pytest.raises(ValueError, match="saved over 6 examples but this dataset has 7"):
        BatchIterator(_data(7), batch_size=2, seed=1).restore(state)
    with pytest.raises(ValueError, match=r"lacks \['batches'\]"):
        it.restore({"epoch": 0, "index": 0, "seed": 1})
    with pytest.raises(ValueError, match="non-negative ints"):
        it.restore(state | {"index": 1.5})
    with pytest.raises(ValueError, match="index=9 is past the end of an epoch of 6"):
        it.restore(state | {"index": 9})


def test_restore_without_num_examples_and_with_a_new_batch_size():
    # A state from another batch size resumes at the same example; past the end of the
    # epoch's full batches it starts the next epoch.
    it = BatchIterator(_data(5), batch_size=2, seed=4)
    it.restore({"epoch": 2, "index": 3, "seed": 4, "batches": 9})
    perm = np.random.default_rng([4, 2]).permutation(5)
    assert _ids(it.next()) == perm[3:5].tolist()
    assert it.state() == {"epoch": 3, "index": 0, "seed": 4, "batches": 10, "num_examples": 5}
    it.restore({"epoch": 2, "index": 4, "seed": 4, "batches": 9})
    assert it.state()["epoch"] == 3
    assert _ids(it.next()) == np.random.default_rng([4, 3]).permutation(5)[:2].tolist()


@given(st.integers(1, 20).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(1, n), st.integers(0, 30), st.integers(1, 25), st.booleans(),
    st.integers(0, 2**32))))
def test_restore_resumes_exactly_property(case):
    n, b, k, m, shuffle, seed = case
    original = BatchIterator(_data(n), batch_size=b, seed=seed, shuffle=shuffle)
    served = [original.next() for _ in range(k)]
    state = json.loads(json.dumps(original.state()))
    assert state["batches"] == k and state["epoch"] == k // (n // b)
    resumed = BatchIterator(_data(n), batch_size=b, seed=seed, shuffle=shuffle)
    resumed.restore(state)
    assert resumed.state() == original.state()
    for _ in range(m):
        a, r = original.next(), resumed.next()
        assert _ids(a) == _ids(r)
        np.testing.assert_array_equal(a["y"][1], r["y"][1])
        served.append(r)
    # Each epoch serves every example at most once, and exactly n // b * b of them.
    per_epoch = n // b
    for e in range(0, len(served) // per_epoch):
        seen = sum((_ids(x) for x in served[e * per_epoch:(e + 1) * per_epoch]), [])
        assert len(seen) == len(set(seen)) == per_epoch * b
    for batch in served:
        np.testing.assert_array_equal(batch["y"][0], batch["x"] * 10)
