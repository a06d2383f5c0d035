"""Exact resume of every training stage: SFT, DPO, PPO and GRPO (and GRPO one-step-off,
``overlap.max_staleness=1``, whose checkpoints hold the pending rollout), each N = 6 steps
straight against the same 6 steps broken by two crashes.

How a crash is simulated, and why it is faithful: the pipeline's ``train_loop`` is wrapped so
that its step function raises inside step ``k + 1`` (after ``k`` completed steps, after the loop
has already appended that step's batch to the ledger). The exception unwinds the loop past its
end-of-run save, so the last checkpoint on disk is the last save boundary, exactly as after a
kill; the only difference from SIGKILL is that pending asynchronous writes finish, and the
SIGKILL case has its own test (``test_crash_safety.py``). Each stage, ``save_every=2`` and 3
batches per epoch (epochs end after steps 3 and 6):

1. crash in step 4 (after step 3, one step before the boundary at 4): the restart resumes from
   step 2 and re-runs step 3 (case "just before a save boundary");
2. that restart crosses the epoch boundary after step 3 (checkpoint 2 is in epoch 0, the crash
   in epoch 1: case "across an epoch boundary"), saves step 4, and crashes in step 5;
3. the next restart resumes from exactly step 4 (case "at a save boundary") and finishes.

The finished run must equal the straight one: the whole ``TrainState`` bitwise (params,
optimizer moments, step, base key, KL-controller state), ``ledger.tsv`` (no batch repeated or
skipped) and every logged train row, including the sampled completions' statistics of PPO and
GRPO, which shows the key of step ``t`` is a function of ``t`` alone.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, LoopConfig, ModelSpec,
                                OptimizerConfig, OverlapConfig, RewardConfig, dpo, grpo,
                                onpolicy, ppo, sft)
from rlhf_jax.rewards.verifiers import exact_match_reward
from rlhf_jax.train import Checkpointer, read_jsonl_metrics
from rlhf_jax.train import supervised as train_supervised
from tests.pipelines.common import assert_states_equal
from tests.reliability.conftest import QUIET, TINY, ledger

STEPS, SAVE_EVERY = 6, 2
CRASHES = (3, 4)  # completed steps when each crash hits
LOOP = LoopConfig(total_steps=STEPS, log_every=1, save_every=SAVE_EVERY, eval_at_start=False)
OPT = OptimizerConfig(learning_rate=1e-3, schedule="constant")
VOLATILE = ("time", "tokens_per_s")  # wall-clock figures, the only ones allowed to differ


def length_reward(prompts, completions, **columns):
    """Characters / 10: a dense reward that depends on the sampled text."""
    return [len(c) / 10.0 for c in completions]


def _configs(world, root: str) -> dict:
    """Stage -> (module, config factory of an output dir, run kwargs). 3 batches per epoch:
    64 SFT rows / 20, 64 pairs / 20, 32 prompts / 10, 16 arithmetic prompts / 5."""
    sft_model = ModelSpec(path=world.sft["model_dir"])
    stages = {
        "sft": (sft, lambda d: sft.SFTConfig(
            data=DataConfig(train=world.pref["sft"], max_length=48, packing=False,
                            batch_size=20, on_overflow="truncate"),
            tokenizer=world.tokenizer, output_dir=d, model=TINY, optimizer=OPT, loop=LOOP,
            logging=QUIET, mesh=None), {}),
        "dpo": (dpo, lambda d: dpo.DPOConfig(
            data=DataConfig(train=world.pref["preference"], max_prompt_length=24,
                            max_length=48, batch_size=20, on_overflow="truncate"),
            tokenizer=world.tokenizer, policy=sft_model, output_dir=d, optimizer=OPT,
            loop=LOOP, logging=QUIET, mesh=None), {}),
        "ppo": (ppo, lambda d: ppo.PPOConfig(
            data=DataConfig(train=world.pref["prompts"], max_prompt_length=24, batch_size=10),
            tokenizer=world.tokenizer, policy=sft_model,
            rewards=RewardConfig(model=ModelSpec(path=world.rm["model_dir"])), output_dir=d,
            sampling=GenerationConfig(max_new_tokens=6),
            algorithm=ppo.PPOAlgorithmConfig(epochs=1, num_minibatches=2),
            kl=KLConfig(coef=0.05, mode="reward", controller="adaptive", target=0.5,
                        horizon=100.0),
            optimizer=OPT, loop=LOOP, logging=QUIET, mesh=None), {}),
        "grpo": (grpo, lambda d: grpo.GRPOConfig(
            data=DataConfig(train=world.arith["train_prompts"], max_prompt_length=16,
                            batch_size=5),
            tokenizer=world.tokenizer, policy=sft_model, output_dir=d,
            sampling=GenerationConfig(max_new_tokens=4),
            algorithm=grpo.GRPOAlgorithmConfig(group_size=2, num_minibatches=2),
            kl=KLConfig(coef=0.05), optimizer=OPT, loop=LOOP, logging=QUIET, mesh=None),
            {"reward_fns": {"exact_match": exact_match_reward, "length": length_reward}}),
    }
    module, make, kwargs = stages["grpo"]
    stages["grpo_one_step_off"] = (module, lambda d: dataclasses.replace(
        make(d), overlap=OverlapConfig(max_staleness=1)), kwargs)
    return stages


class _Crash(Exception):
    pass


def _run(module, cfg, kwargs, monkeypatch, *, crash_after: int | None = None) -> dict:
    """One invocation of the stage; records the step it started from; optionally crashes."""
    # the supervised stages reach the loop through train.supervised.fit, PPO and GRPO through
    # pipelines.onpolicy.run_onpolicy; both import it at module level
    target = onpolicy if module in (ppo, grpo) else train_supervised
    real = target.train_loop
    seen = {}

    def train_loop(loop_cfg, *, step_fn, **kw):
        def step(state, *batches):  # (batch) or, one-step-off, (batch, next batch)
            s = int(state.step)
            seen.setdefault("first", s)
            if s == crash_after:
                raise _Crash(f"simulated crash in step {s + 1}")
            return step_fn(state, *batches)

        return real(loop_cfg, step_fn=step, **kw)

    with monkeypatch.context() as m:
        m.setattr(target, "train_loop", train_loop)
        if crash_after is None:
            return module.run(cfg, **kwargs) | {"first": seen.get("first")}
        with pytest.raises(_Crash, match=f"simulated crash in step {crash_after + 1}"):
            module.run(cfg, **kwargs)
    return {"first": seen.get("first")}


def _checkpoints(run_dir: str, like) -> tuple[list[int], dict]:
    """The steps on disk and the latest one's metadata (restored into ``like``'s structure)."""
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"))
    steps = ck.all_steps()
    _, meta = ck.restore(None, like)
    ck.close()
    return steps, meta


def _train_rows(run_dir: str) -> list[dict]:
    rows = read_jsonl_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows
            if r["split"] == "train"]


@pytest.mark.parametrize("stage", [  # SFT and PPO also in tests/pipelines: those with -m slow
    pytest.param("sft", marks=pytest.mark.slow), "dpo", pytest.param("ppo", marks=pytest.mark.slow),
    "grpo", "grpo_one_step_off"])
def test_resume_matrix(world, tmp_path, monkeypatch, stage):
    module, make, kwargs = _configs(world, str(tmp_path))[stage]
    straight = _run(module, make(str(tmp_path / "straight")), kwargs, monkeypatch)
    want_ledger = ledger(straight["run_dir"])
    assert len(want_ledger) == STEPS and len(set(want_ledger)) == STEPS

    cfg = make(str(tmp_path / "crashed"))
    run_dir = cfg.output_dir
    # 1. crash one step before the save boundary at 4: only step 2 is on disk
    first = _run(module, cfg, kwargs, monkeypatch, crash_after=CRASHES[0])
    steps, meta = _checkpoints(run_dir, straight["state"])
    assert first["first"] == 0 and steps == [2]
    assert meta["data"]["epoch"] == 0 and meta["data"]["batches"] == 2
    assert ledger(run_dir) == want_ledger[:4]  # step 3's batch was taken when it died
    # 2. restart: resumes from 2 (step 3 runs again), crosses the epoch end, crashes in step 5
    second = _run(module, cfg, kwargs, monkeypatch, crash_after=CRASHES[1])
    steps, meta = _checkpoints(run_dir, straight["state"])
    assert second["first"] == 2 and steps == [2, 4]
    assert meta["data"]["epoch"] == 1 and meta["data"]["batches"] == 4
    assert ledger(run_dir) == want_ledger[:5]  # no repeat of step 3: the ledger was truncated
    # 3. restart at the save boundary 4 and finish
    final = _run(module, cfg, kwargs, monkeypatch)
    assert final["first"] == 4 and final["steps"] == STEPS

    if stage != "grpo_one_step_off":
        assert final["state"].pending == ()
    else:  # the rollout of the batch after the last one, sampled before the last update
        assert int(final["state"].pending.index.shape[0]) == 5
    stage = stage.removesuffix("_one_step_off")
    if stage in ("ppo", "grpo"):  # the trained tree the comparison covers: critic included
        want_keys = {"policy", "value"} if stage == "ppo" else {"policy"}
        assert set(final["state"].params) == set(straight["state"].params) == want_keys
    assert_states_equal(final["state"], straight["state"])
    assert ledger(run_dir) == want_ledger
    got, want = _train_rows(run_dir), _train_rows(straight["run_dir"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert got == want
    if stage in ("ppo", "grpo"):  # equal rows include statistics of the sampled completions
        assert {"response_length", "truncated_frac",
                "logprob_diff_sampler_trainer"} <= got[0].keys()
