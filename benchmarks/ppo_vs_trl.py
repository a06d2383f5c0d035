"""PPO seconds per rollout + update iteration: ours vs TRL's PPO trainer
(``trl.experimental.ppo``), same checkpoints, same run.

``python -m benchmarks.ppo_vs_trl`` (``--batch/--prompt-len/--new/--epochs/--minibatches/
--repeats``, ``--no-trl``). One iteration: sample one completion of ``new`` tokens for each of
``batch`` random prompts (temperature 1, never stopping early in TRL: no stop token), score
them with the policy, the frozen reference, a separate value model and a reward model (both
initialised from one ``LlamaForSequenceClassification`` checkpoint), per-token reward
``score - 0.05 * k1``, GAE (gamma 1, lambda 0.95), whitened advantages, then ``epochs`` passes of
``minibatches`` AdamW updates (constant lr, no gradient clipping: TRL's PPO loop does not clip)
on the clipped policy loss + 0.1 x clipped value loss (clip 0.2 both).

* Ours is the PPO pipeline's iteration: ``pipelines.ppo.ppo_algorithm`` on the on-policy
  engine (``train.OnPolicyEngine``), its compiled ``rollout`` and ``update`` exactly as
  ``engine.step`` calls them (with no reward functions nothing leaves the device between them).
* TRL: ``PPOTrainer.train()`` timed per iteration by a callback (``on_step_end``).

``ours_breakdown_s`` splits our iteration with ``block_until_ready`` between phases; the
rollout's parts are also timed as separate jitted calls.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks._common import emit
from benchmarks._vs_trl import (EOS_ID, PAD_ID, SMALL_LLAMA, hf_tokenizer, load_ours,
                                make_checkpoint, make_step_clock, parse_args, r, random_prompts,
                                summarize, time_ours, trl_common_args, value_from_reward, versions,
                                write_tokenizer)
from rlhf_jax.models import completion_values, score_completions, sequence_rewards
from rlhf_jax.ops import kl_controller_init
from rlhf_jax.pipelines.config import KLConfig
from rlhf_jax.pipelines.ppo import PPOAlgorithmConfig, ppo_algorithm
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import Models, OnPolicyEngine, OptimizerConfig, Rewards, make_optimizer

LR, KL_COEF, VF_COEF = 1e-5, 0.05, 0.1


def ours(ckpt, rm_ckpt, prompts: np.ndarray, a, counter) -> dict:
    policy, p_params = load_ours(ckpt, heads=("lm",))
    ref_params = jax.tree.map(lambda x: x.copy(), p_params)
    rm, rm_params = load_ours(rm_ckpt, heads=("reward",), seed=1)
    critic, v_params = value_from_reward(rm_ckpt)
    algo = ppo_algorithm(
        PPOAlgorithmConfig(epochs=a.epochs, num_minibatches=a.minibatches, discount=1.0,
                           gae_lambda=0.95, clip_eps_low=0.2, value_clip=0.2, vf_coef=VF_COEF,
                           entropy_coef=0.0, whiten_advantages=True, aggregation="token_mean",
                           value_model="separate"),
        KLConfig(coef=KL_COEF, mode="reward", controller="fixed"))
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=(EOS_ID,), pad_id=PAD_ID,
                              temperature=1.0)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant",
                                               max_grad_norm=None), 1000)
    models = Models(policy=policy, critic=critic, reference=policy, reward=rm)
    engine = OnPolicyEngine(algo, models, sampling=sampling, optimizer=optimizer,
                            rewards=Rewards())
    frozen = {"reference": ref_params, "reward": rm_params}
    mask = np.ones((a.batch, a.prompt_len), bool)
    box = {"state": engine.init({"policy": p_params, "value": v_params}, frozen, seed=0,
                                algo_state=kl_controller_init(KL_COEF)),
           "i": 0, "phases": []}

    def step():  # engine.step with a clock between the rollout and the update
        i = box["i"] % (len(prompts) // a.batch)
        box["i"] += 1
        t0 = time.perf_counter()
        s = box["state"]
        ro, rm_scores, _ = engine.rollout_jit(s.params, s.rng, s.step, engine.frozen,
                                              prompts[i * a.batch:(i + 1) * a.batch], mask)
        jax.block_until_ready(ro)
        t1 = time.perf_counter()
        box["state"], up_metrics = engine.update_jit(box["state"], engine.frozen, ro, None,
                                                       rm_scores)
        jax.block_until_ready(up_metrics["loss"])
        box["phases"].append((t1 - t0, time.perf_counter() - t1))

    res = time_ours(step, repeats=a.repeats, counter=counter)
    res["cache_sizes"] = {"rollout": engine.rollout_jit._cache_size(),
                          "update": engine.update_jit._cache_size()}
    first, rest = box["phases"][0], box["phases"][1:]
    med = [statistics.median(x) for x in zip(*rest)]
    res["breakdown"] = {"rollout_total": r(med[0]), "update": r(med[1])}
    res["compile_breakdown"] = {"rollout": r(first[0] - med[0], 2),
                                "update": r(first[1] - med[1], 2)}
    res["breakdown"] |= rollout_parts(models, box["state"].params, frozen, sampling,
                                      prompts[:a.batch], mask, a.repeats)
    return res


def rollout_parts(models, params, frozen, sampling, prompts, mask, repeats) -> dict:
    """The rollout's model calls as separate jitted functions (median of ``repeats``)."""
    ref_params, rm_params = frozen["reference"], frozen["reward"]
    sample = make_sampler(models.policy, sampling)

    def args(o):
        return o.prompt_tokens, o.prompt_mask, o.tokens, o.mask

    pol = jax.jit(lambda p, o: score_completions(models.policy, p, *args(o), temperature=1.0,
                                                 entropy=True))
    ref = jax.jit(lambda p, o: score_completions(models.reference, p, *args(o),
                                                 temperature=1.0).logprobs)
    val = jax.jit(lambda p, o: completion_values(models.critic, p, *args(o)))
    rew = jax.jit(lambda p, o: sequence_rewards(models.reward, p, *args(o)))
    key = jax.random.PRNGKey(1)
    out = jax.block_until_ready(sample(params["policy"], prompts, mask, key))
    parts = {"rollout.generate": lambda: sample(params["policy"], prompts, mask, key),
             "rollout.policy_logprobs_entropy": lambda: pol(params["policy"], out),
             "rollout.reference_logprobs": lambda: ref(ref_params, out),
             "rollout.values": lambda: val(params["value"], out),
             "rollout.reward_model": lambda: rew(rm_params, out)}
    res = {}
    for name, fn in parts.items():
        jax.block_until_ready(fn())
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            runs.append(time.perf_counter() - t)
        res[name] = r(statistics.median(runs))
    return res


def theirs(ckpt: str, rm_ckpt: str, tok_dir: str, prompts: np.ndarray, a) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig, PPOTrainer

    def lm():
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")

    def seq_cls():
        return AutoModelForSequenceClassification.from_pretrained(rm_ckpt, dtype="float32",
                                                                  num_labels=1)

    ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, p)) for p in prompts]})
    clock = make_step_clock()
    n = a.batch * (a.repeats + 1)
    with tempfile.TemporaryDirectory() as out:
        common = trl_common_args(out, steps=1 + a.repeats, lr=LR, batch=a.batch)
        args = TRLPPOConfig(**common, total_episodes=n, num_ppo_epochs=a.epochs,
                            num_mini_batches=a.minibatches, response_length=a.new,
                            temperature=1.0, kl_coef=KL_COEF, kl_estimator="k1",
                            cliprange=0.2, cliprange_value=0.2, vf_coef=VF_COEF, gamma=1.0,
                            lam=0.95, whiten_rewards=False, num_sample_generations=0,
                            stop_token=None, missing_eos_penalty=None,
                            local_rollout_forward_batch_size=a.batch,
                            sft_model_path=ckpt, reward_model_path=rm_ckpt)
        trainer = PPOTrainer(args=args, processing_class=hf_tokenizer(tok_dir), model=lm(),
                             ref_model=lm(), reward_model=seq_cls(), value_model=seq_cls(),
                             train_dataset=ds, eval_dataset=ds, callbacks=[clock])
        trainer.train()
    return clock.step_seconds()


def main(argv=None) -> dict:
    a, counter, has_trl = parse_args(__doc__, argv, batch=16, prompt_len=32, new=64, epochs=2,
                                     minibatches=2, repeats=3)
    prompts = random_prompts(a.batch * (a.repeats + 1), a.prompt_len)
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint(f"{d}/policy") if has_trl else None
        rm_ckpt = make_checkpoint(f"{d}/reward", seed=1, kind="reward") if has_trl else None
        mine = ours(ckpt, rm_ckpt, prompts, a, counter)
        trl_res = None
        if has_trl:
            trl_res = theirs(ckpt, rm_ckpt, write_tokenizer(f"{d}/tok", SMALL_LLAMA["vocab_size"]),
                             prompts, a)
    rec = {"benchmark": "ppo_vs_trl", "batch": a.batch, "prompt_len": a.prompt_len,
           "new_tokens": a.new, "ppo_epochs": a.epochs, "minibatches": a.minibatches,
           "models": "policy + reference + value + reward, 4 x 7.1M params",
           "target_ratio": 5.0, "ours_cache_sizes": mine["cache_sizes"]}
    rec |= summarize(mine, trl_res, unit="s/step", work=1)
    rec |= {"ours_breakdown_s": mine["breakdown"],
            "ours_compile_breakdown_s": mine["compile_breakdown"], "versions": versions()}
    return emit(rec)


if __name__ == "__main__":
    main()
