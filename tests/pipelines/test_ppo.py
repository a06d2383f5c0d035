"""PPO: separate and shared critics, KL in the reward and in the loss, the adaptive controller,
sampler/trainer agreement, exact resume, and config checks."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import load_hf_checkpoint
from rlhf_jax.ops import adaptive_kl_update, kl_controller_init
from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, ModelSpec,
                                OptimizerConfig, OverlapConfig, RewardConfig, ppo)
from tests.pipelines.common import (assert_moved, assert_run_outputs, assert_states_equal,
                                    read, train_rows)
from tests.pipelines.conftest import LOG, loop

OPT = OptimizerConfig(learning_rate=1e-3, schedule="constant")
ADAPTIVE_KL = KLConfig(coef=0.05, mode="reward", controller="adaptive", target=0.5,
                       horizon=100.0)
LOSS_KL = KLConfig(coef=0.1, mode="loss")


def algo(**kw) -> ppo.PPOAlgorithmConfig:
    return ppo.PPOAlgorithmConfig(**({"epochs": 1, "num_minibatches": 2} | kw))


def ppo_config(world, name: str, *, steps: int = 4, batch_size: int = 8,
               **kw) -> ppo.PPOConfig:
    base = dict(data=DataConfig(train=world.pref["prompts"], max_prompt_length=24,
                                batch_size=batch_size),
                tokenizer=world.tokenizer, policy=ModelSpec(path=world.sft["model_dir"]),
                rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"])),
                output_dir=os.path.join(world.root, name),
                sampling=GenerationConfig(max_new_tokens=6), algorithm=algo(),
                optimizer=OPT, loop=loop(steps), logging=LOG, mesh=None)
    return ppo.PPOConfig(**(base | kw))


@pytest.fixture(scope="module")
def adaptive(world):
    """Separate critic, KL in the reward, adaptive controller: 4 steps straight."""
    return ppo.run(ppo_config(world, "ppo_adaptive", kl=ADAPTIVE_KL))


@pytest.fixture(scope="module")
def shared(world):
    """Value head on the policy, KL (k3) in the loss, fixed coefficient: 3 steps."""
    return ppo.run(ppo_config(world, "ppo_shared", steps=3, algorithm=algo(value_model="shared"),
                              kl=LOSS_KL))


def test_ppo_separate_critic_kl_in_reward(world, adaptive):
    rows = assert_run_outputs(adaptive, steps=4, kind="PPOConfig")
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert_moved(adaptive["model_dir"], init, heads=("lm",))
    # the critic starts from the reward model and trains too
    _, rm = load_hf_checkpoint(world.rm["model_dir"], heads=("value",))
    critic = adaptive["state"].params["value"]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(critic), jax.tree.leaves(rm)))
    # step 1 samples from the reference itself: KL exactly 0, and with KL in the reward the
    # non-score reward is -beta * KL
    assert rows[0]["kl"] == 0.0 and rows[0]["non_score_reward"] == 0.0
    for r in rows:
        assert r["non_score_reward"] == pytest.approx(-r["kl_coef"] * r["kl"], rel=1e-5,
                                                      abs=1e-9)
        assert 0.0 <= r["truncated_frac"] <= 1.0 and 1.0 <= r["response_length"] <= 6.0
        assert "policy/kl" not in r and "value_loss" in r and "policy/clip_frac" in r


def test_ppo_adaptive_controller_moves_kl_coef(adaptive):
    rows = train_rows(adaptive["run_dir"])
    assert rows[0]["kl_coef"] == pytest.approx(0.05, rel=1e-7)
    state = kl_controller_init(0.05)
    for r in rows:
        assert r["kl_coef"] == pytest.approx(float(state.kl_coef), rel=1e-6)
        state = adaptive_kl_update(state, observed_kl=jnp.float32(r["kl"]), n_steps=8,
                                   target=0.5, horizon=100.0)
    # KL 0 < target at step 1: the coefficient shrinks by the clipped factor 1 - 0.2 * 8 / 100
    assert rows[1]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100), rel=1e-6)
    assert adaptive["kl_coef"] == pytest.approx(float(state.kl_coef), rel=1e-6)
    assert adaptive["kl_coef"] < 0.05


def test_ppo_shared_value_kl_in_loss(world, shared):
    rows = assert_run_outputs(shared, steps=3, kind="PPOConfig")
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm", "value"))
    assert_moved(shared["model_dir"], init, heads=("lm", "value"))
    assert "value" not in shared["state"].params  # no separate critic
    config, _ = load_hf_checkpoint(shared["model_dir"])
    assert config.heads == ("lm", "value")
    assert rows[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    for r in rows:
        assert r["policy/kl"] >= 0.0  # k3 is non-negative per token
        assert r["kl_coef"] == pytest.approx(0.1, rel=1e-7)  # fixed controller
        assert r["non_score_reward"] == pytest.approx(-0.1 * r["kl"], rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("which", ["adaptive", "shared"])
def test_ppo_sampler_and_trainer_logprobs_agree(which, request):
    result = request.getfixturevalue(which)
    diffs = [r["logprob_diff_sampler_trainer"] for r in train_rows(result["run_dir"])]
    assert max(diffs) < 1e-4, diffs


def test_ppo_exact_resume(world, adaptive):
    cfg = ppo_config(world, "ppo_resumed", kl=ADAPTIVE_KL, loop=loop(2))
    first = ppo.run(cfg)
    assert first["steps"] == 2
    second = ppo.run(dataclasses.replace(cfg, loop=loop(4)))
    assert_states_equal(second["state"], adaptive["state"])  # params, Adam, KL coef, step, key
    assert read(os.path.join(second["run_dir"], "ledger.tsv")) == read(
        os.path.join(adaptive["run_dir"], "ledger.tsv"))
    assert second["kl_coef"] == adaptive["kl_coef"]
    a = [(r["reward"], r["kl"], r["loss"]) for r in train_rows(second["run_dir"])]
    b = [(r["reward"], r["kl"], r["loss"]) for r in train_rows(adaptive["run_dir"])]
    assert a == b


def test_ppo_config_checks(world):
    with pytest.raises(ValueError, match="data.batch_size 10 is not divisible by "
                                         "algorithm.num_minibatches 4"):
        ppo_config(world, "x", batch_size=10, algorithm=algo(num_minibatches=4))
    with pytest.raises(ValueError, match="algorithm.value_model"):
        ppo_config(world, "x", algorithm=algo(value_model="tied"))
    with pytest.raises(ValueError, match="kl.mode"):
        ppo_config(world, "x", kl=KLConfig(coef=0.05, mode="both"))
    with pytest.raises(ValueError, match="kl.controller"):
        ppo_config(world, "x", kl=KLConfig(coef=0.05, mode="reward", controller="pid"))
    with pytest.raises(ValueError, match="algorithm.epochs"):
        ppo_config(world, "x", algorithm=algo(epochs=0))
    with pytest.raises(ValueError, match="PPO needs rewards.model"):
        ppo_config(world, "x", rewards=RewardConfig())


def test_ppo_entropy_bonus_only_when_asked(world, shared):
    """``entropy_coef = 0`` skips the update's entropy pass over the vocabulary; a positive
    coefficient puts the bonus back: same first rollout, different parameters after it."""
    cfg = ppo_config(world, "ppo_entropy", steps=3,
                     algorithm=algo(value_model="shared", entropy_coef=0.5), kl=LOSS_KL)
    bonus = ppo.run(cfg)
    rows, base = train_rows(bonus["run_dir"]), train_rows(shared["run_dir"])
    assert rows[0]["reward"] == pytest.approx(base[0]["reward"], abs=1e-6)  # same samples
    assert rows[0]["entropy"] == pytest.approx(base[0]["entropy"], rel=1e-5)
    leaves = zip(jax.tree.leaves(bonus["state"].params["policy"]),
                 jax.tree.leaves(shared["state"].params["policy"]))
    assert any(not np.allclose(np.asarray(a), np.asarray(b), atol=1e-6) for a, b in leaves)


def test_ppo_one_step_off(world):
    """``overlap.max_staleness=1`` with a separate critic and the KL in the reward: the
    proximal policy is scored before the minibatch updates, the run trains and logs the
    off-policy metrics."""
    result = ppo.run(ppo_config(world, "ppo_one_step_off", steps=3, kl=ADAPTIVE_KL,
                                overlap=OverlapConfig(max_staleness=1)))
    rows = assert_run_outputs(result, steps=3, kind="PPOConfig")
    assert rows[0]["offpolicy/logprob_diff"] < 1e-4  # step 0 samples with its own params
    assert all(r["offpolicy/logprob_diff"] > 1e-6 for r in rows[1:])  # later ones a step late
    assert all(0.0 <= r["offpolicy/is_clipped_frac"] <= 1.0 for r in rows)
    _, init = load_hf_checkpoint(world.sft["model_dir"], heads=("lm",))
    assert_moved(result["model_dir"], init, heads=("lm",))
