"""Best-of-N: the selection rule by hand, and a run whose output is valid SFT data holding each
group's best-scored completion."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments.tasks import preference_world
from rlhf_jax.data import load_jsonl
from rlhf_jax.pipelines import DataConfig, GenerationConfig, ModelSpec, RewardConfig, best_of_n


def test_select_best_by_hand():
    s = np.array([0.1, 0.9, 0.3,    # best is sample 1
                  -1.0, -2.0, -0.5,  # best is sample 2 (flat index 5)
                  0.4, 0.4, 0.2,     # tie -> first
                  7.0, 7.0, 7.0])    # all equal -> first
    np.testing.assert_array_equal(best_of_n.select_best(s, 3), [1, 5, 6, 9])
    np.testing.assert_array_equal(best_of_n.select_best(np.array([3.0, 1.0, 2.0]), 1), [0, 1, 2])
    np.testing.assert_array_equal(best_of_n.select_best(np.array([-np.inf, 0.0]), 2), [1])


def test_best_of_n_config_checks():
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        best_of_n.BestOfNConfig(data=DataConfig(train="x"), tokenizer="y", policy=ModelSpec(),
                                rewards=RewardConfig(model=ModelSpec()), group_size=0)
    with pytest.raises(ValueError, match="temperature=0 draws the same completion 4 times"):
        best_of_n.BestOfNConfig(data=DataConfig(train="x"), policy=ModelSpec(),
                                rewards=RewardConfig(model=ModelSpec()), group_size=4,
                                sampling=GenerationConfig(temperature=0.0))


def test_best_of_n_run(world, monkeypatch):
    calls = []

    def spy(scores, n):  # record every group's scores and the selection the run made
        idx = select(scores, n)
        calls.append((np.asarray(scores).copy(), n, idx))
        return idx

    select = best_of_n.select_best
    monkeypatch.setattr(best_of_n, "select_best", spy)
    out_dir = os.path.join(world.root, "bon")
    cfg = best_of_n.BestOfNConfig(
        data=DataConfig(train=world.pref["eval_prompts"], max_prompt_length=24, batch_size=6),
        tokenizer=world.tokenizer, policy=ModelSpec(path=world.sft["model_dir"]),
        rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"])), output_dir=out_dir,
        group_size=4, sampling=GenerationConfig(max_new_tokens=5), progress=False)
    result = best_of_n.run(cfg, eval_rewards={"gold": preference_world.gold_reward})

    # 16 prompts in batches of 6: 6 + 6 + 4 real rows (the last batch wraps around)
    assert len(calls) == 3 and all(c[1] == 4 and c[0].shape == (24,) for c in calls)
    best = np.concatenate([c[0].reshape(-1, 4).max(1) for c in calls])[:16]
    means = np.concatenate([c[0].reshape(-1, 4).mean(1) for c in calls])[:16]

    ds = load_jsonl(result["output"], fmt="prompt_completion")
    rows = list(ds.rows)
    prompts = [json.loads(ln)["prompt"] for ln in open(world.pref["eval_prompts"],
                                                       encoding="utf-8")]
    assert [r["prompt"] for r in rows] == prompts
    assert all(isinstance(r["completion"], str) for r in rows)
    np.testing.assert_allclose([r["score"] for r in rows], best, rtol=1e-6)
    np.testing.assert_allclose([r["group_mean_score"] for r in rows], means, rtol=1e-5,
                               atol=1e-7)
    assert all(r["score"] >= r["group_mean_score"] - 1e-7 for r in rows)

    with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved == result and result["prompts"] == 16 and result["group_size"] == 4
    assert result["reward_model/best_mean"] == pytest.approx(best.mean(), rel=1e-5)
    assert result["reward_model/sample_mean"] == pytest.approx(means.mean(), rel=1e-5,
                                                               abs=1e-7)
    assert result["reward_model/best_mean"] >= result["reward_model/sample_mean"]
    gold = preference_world.gold_reward([r["prompt"] for r in rows],
                                        [r["completion"] for r in rows])
    assert result["gold/best_mean"] == pytest.approx(float(np.mean(gold)), abs=1e-6)
    assert -1.0 <= result["gold/sample_mean"] <= 1.0
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["kind"] == "BestOfNConfig"
