"""Reward functions' values are never silently converted, missing or non-finite rewards stop the
run (or, opted in, leave the completion out, counted), and every call has a time limit."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rlhf_jax.rewards import call_reward_fns, combine_rewards, nan_means

PROMPTS = ["a", "b", "c", "d"]
TEXTS = ["w", "x", "y", "z"]


def _call(**fns):
    return call_reward_fns(fns, PROMPTS, TEXTS, {}, time_limit=2.0)


def test_numbers_and_none_weighted_sum_of_the_functions_that_apply():
    scores = _call(f=lambda prompts, completions: [1, 2.5, None, True],
                   g=lambda prompts, completions: [None, np.float32(1.0), None, 0.0])
    np.testing.assert_array_equal(scores.values["f"], [1.0, 2.5, np.nan, 1.0])
    assert scores.timeouts == {"f": 0, "g": 0}
    assert nan_means(scores) == {"f": pytest.approx(4.5 / 3), "g": pytest.approx(0.5)}
    with_model = combine_rewards(scores, {"f": 2.0}, PROMPTS, non_finite="error",
                                 has_model=True)
    np.testing.assert_allclose(with_model, [2.0, 6.0, 0.0, 2.0])  # "c": only the RM scores
    with pytest.raises(ValueError, match=r"every reward function returned None \(does not "
                                         r"apply\) for completion 2 \(prompt 'c'\)"):
        combine_rewards(scores, {}, PROMPTS, non_finite="error", has_model=False)
    dropped = combine_rewards(scores, {}, PROMPTS, non_finite="drop", has_model=False)
    assert np.isnan(dropped[2]) and np.isfinite(dropped[[0, 1, 3]]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -np.inf])
def test_non_finite_is_an_error_naming_the_function_or_a_counted_drop(bad):
    scores = _call(f=lambda prompts, completions: [0.0, bad, 1.0, 1.0])
    with pytest.raises(ValueError) as err:
        combine_rewards(scores, {}, PROMPTS, non_finite="error", has_model=False)
    assert str(err.value).startswith("reward function 'f' returned a non-finite reward for "
                                     "completion 1 (prompt 'b')")
    assert "rewards.non_finite='drop'" in str(err.value)
    total = combine_rewards(scores, {}, PROMPTS, non_finite="drop", has_model=True)
    assert np.isnan(total).tolist() == [False, True, False, False]


@pytest.mark.parametrize("value", ["1.5", b"1", [1.0], {"r": 1}])
def test_values_are_never_converted(value):
    with pytest.raises(TypeError, match=r"reward function 'f' returned .* for completion 3: a "
                                        r"reward is a number, or None"):
        _call(f=lambda prompts, completions: [0.0, 1.0, 2.0, value])


@pytest.mark.parametrize("raw, got", [([1.0], "length 1"), ("abcd", "str"), (3.0, "float")])
def test_one_reward_per_completion(raw, got):
    with pytest.raises(ValueError, match=f"returned {got}, expected 4 rewards"):
        _call(f=lambda prompts, completions: raw)


def test_a_call_over_the_time_limit_scores_its_batch_zero_and_is_counted():
    def slow(prompts, completions):
        time.sleep(5)
        return [1.0] * len(completions)

    start = time.monotonic()
    scores = call_reward_fns({"slow": slow}, PROMPTS, TEXTS, {}, time_limit=0.2)
    assert time.monotonic() - start < 3
    assert scores.timeouts == {"slow": 1}
    np.testing.assert_array_equal(scores.values["slow"], np.zeros(4))


def test_a_failing_function_is_named():
    def broken(prompts, completions):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="reward function 'broken' failed: 'answer'"):
        _call(broken=broken)
