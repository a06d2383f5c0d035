"""The configuration blocks' checks (``pipelines.config`` and the stage configs): each mistake is
refused at construction, naming the field, before any file is read or anything compiled; and
the on-policy stages' algorithm flags follow their configs. No model, no data: instant."""

from __future__ import annotations

import pytest

from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, LoopConfig, ModelSpec,
                                OnPolicyConfig, OptimizerConfig, RewardConfig, SupervisedConfig,
                                grpo, ppo, sft)

DATA = DataConfig(train="train.jsonl", batch_size=32)


def onpolicy_kw(**kw) -> dict:
    return dict(data=DATA, tokenizer="tok", policy=ModelSpec(), output_dir="out") | kw


def ppo_config(**kw) -> ppo.PPOConfig:
    return ppo.PPOConfig(**onpolicy_kw(rewards=RewardConfig(model=ModelSpec())) | kw)


def test_data_config_checks():
    with pytest.raises(ValueError, match="data.on_overflow must be one of .* got 'wrap'"):
        DataConfig(train="x", on_overflow="wrap")
    for name in ("batch_size", "max_prompt_length", "max_length"):
        with pytest.raises(ValueError, match=f"data.{name} must be >= 1, got 0"):
            DataConfig(train="x", **{name: 0})
    for policy in ("error", "truncate", "skip"):
        assert DataConfig(train="x", on_overflow=policy).on_overflow == policy


def test_generation_config_checks():
    with pytest.raises(ValueError, match="sampling.max_new_tokens must be >= 1"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="sampling.temperature must be >= 0"):
        GenerationConfig(temperature=-0.5)


def test_kl_config_checks():
    with pytest.raises(ValueError, match="kl.estimator must be one of .* got 'k4'"):
        KLConfig(estimator="k4")
    with pytest.raises(ValueError, match="kl.mode must be 'reward' or 'loss', got 'both'"):
        KLConfig(mode="both")
    with pytest.raises(ValueError, match="kl.controller must be one of .* got 'pid'"):
        KLConfig(controller="pid")
    with pytest.raises(ValueError, match="kl.coef must be >= 0"):
        KLConfig(coef=-0.1)
    for est in ("k1", "k2", "k3"):
        KLConfig(estimator=est)


def test_reward_config_weights_must_match_functions():
    with pytest.raises(ValueError, match="rewards.weights has 1 entries for 2 rewards.functions"):
        RewardConfig(functions=("a", "b"), weights=(1.0,))
    with pytest.raises(ValueError, match="rewards.weights has 2 entries for 0 rewards.functions"):
        RewardConfig(weights=(1.0, 2.0))
    RewardConfig(functions=("a", "b"))  # no weights: 1 each
    RewardConfig(functions=("a", "b"), weights=(0.5, 2.0))


def test_warmup_longer_than_the_run_names_both_fields():
    match = r"optimizer.warmup_steps 10 exceeds the run's loop.total_steps 5"
    with pytest.raises(ValueError, match=match):
        SupervisedConfig(data=DATA, tokenizer="tok", output_dir="out",
                         optimizer=OptimizerConfig(warmup_steps=10),
                         loop=LoopConfig(total_steps=5))
    with pytest.raises(ValueError, match=match):  # SFT's default warmup is 10 steps
        sft.SFTConfig(data=DATA, tokenizer="tok", output_dir="out",
                      loop=LoopConfig(total_steps=5))
    with pytest.raises(ValueError, match=match):
        OnPolicyConfig(**onpolicy_kw(optimizer=OptimizerConfig(warmup_steps=10),
                                     loop=LoopConfig(total_steps=5)))
    SupervisedConfig(data=DATA, tokenizer="tok", output_dir="out",  # equal is fine
                     optimizer=OptimizerConfig(warmup_steps=5), loop=LoopConfig(total_steps=5))


def test_supervised_config_checks():
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        SupervisedConfig(data=DATA, tokenizer="tok", output_dir="out", micro_batches=0)
    with pytest.raises(ValueError, match="data.batch_size 32 is not divisible by micro_batches 5"):
        SupervisedConfig(data=DATA, tokenizer="tok", output_dir="out", micro_batches=5)


def test_onpolicy_refuses_truncating_prompts():
    with pytest.raises(ValueError, match="data.on_overflow='truncate' would cut prompts"):
        OnPolicyConfig(**onpolicy_kw(data=DataConfig(train="x", on_overflow="truncate")))


def test_grpo_keeps_the_kl_in_the_loss():
    msg = r"GRPO keeps the KL in the loss with a fixed coefficient \(kl.mode='loss'"
    with pytest.raises(ValueError, match=msg):
        grpo.GRPOConfig(**onpolicy_kw(kl=KLConfig(coef=0.1, mode="reward")))
    with pytest.raises(ValueError, match=msg):
        grpo.GRPOConfig(**onpolicy_kw(kl=KLConfig(coef=0.1, controller="adaptive")))
    grpo.GRPOConfig(**onpolicy_kw(kl=KLConfig(coef=0.1)))


def test_grpo_algorithm_checks():
    with pytest.raises(ValueError, match="algorithm.group_size must be >= 2"):
        grpo.GRPOAlgorithmConfig(group_size=1)
    with pytest.raises(ValueError, match="algorithm.variant must be one of"):
        grpo.GRPOAlgorithmConfig(variant="ppo")
    with pytest.raises(ValueError, match="algorithm.epochs and algorithm.num_minibatches"):
        grpo.GRPOAlgorithmConfig(epochs=0)
    with pytest.raises(ValueError, match=r"data.batch_size \* algorithm.group_size = 12 must be "
                                         r"divisible by algorithm.num_minibatches 5"):
        grpo.GRPOConfig(**onpolicy_kw(data=DataConfig(train="x", batch_size=3),
                                      algorithm=grpo.GRPOAlgorithmConfig(group_size=4,
                                                                         num_minibatches=5)))
    # greedy groups are identical: every advantage 0, a run that trains nothing
    with pytest.raises(ValueError, match=r"sampling.temperature=0 samples every completion of "
                                         r"a group alike"):
        grpo.GRPOConfig(**onpolicy_kw(sampling=GenerationConfig(temperature=0.0)))


def test_ppo_needs_a_reward_model():
    with pytest.raises(ValueError, match=r"PPO needs rewards.model \(a reward-model checkpoint\)"):
        ppo.PPOConfig(**onpolicy_kw())
    with pytest.raises(ValueError, match="PPO needs rewards.model"):
        ppo.PPOConfig(**onpolicy_kw(rewards=RewardConfig(functions=("a",))))
    cfg = ppo_config()
    assert cfg.kl == KLConfig(coef=0.05, mode="reward")  # PPO's default leash


def test_ppo_algorithm_checks():
    with pytest.raises(ValueError, match="algorithm.value_model must be 'separate' or 'shared'"):
        ppo.PPOAlgorithmConfig(value_model="tied")
    with pytest.raises(ValueError, match="algorithm.aggregation must be one of"):
        ppo.PPOAlgorithmConfig(aggregation="mean")
    with pytest.raises(ValueError, match="data.batch_size 10 is not divisible by "
                                         "algorithm.num_minibatches 4"):
        ppo_config(data=DataConfig(train="x", batch_size=10))


def test_algorithm_flags_follow_the_config():
    """GRPO skips scoring the policy only with one update per rollout and ``reuse_logprobs``;
    PPO always scores it (and its entropy), and reads the updated policy's entropy only under a
    bonus."""
    def algo(**kw):
        return grpo.grpo_algorithm(grpo.GRPOAlgorithmConfig(**kw), KLConfig(coef=0.1),
                                   max_new_tokens=8)

    assert algo().score_old is False
    assert algo(reuse_logprobs=False).score_old is True
    one = algo(epochs=2, num_minibatches=2)
    assert one.score_old is True and (one.epochs, one.num_minibatches) == (2, 2)
    assert algo(epochs=2).score_old is True and algo(num_minibatches=2).score_old is True

    cfg = ppo_config()
    a = ppo.ppo_algorithm(cfg.algorithm, cfg.kl)
    assert a.score_old and a.rollout_entropy and not a.loss_entropy
    assert (a.epochs, a.num_minibatches) == (2, 4)
    b = ppo.ppo_algorithm(ppo.PPOAlgorithmConfig(entropy_coef=0.01, epochs=1), cfg.kl)
    assert b.loss_entropy and b.epochs == 1 and b.next_algo_state is not None
