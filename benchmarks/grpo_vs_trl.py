"""GRPO seconds per step: our rollout + update vs TRL ``GRPOTrainer`` (no vLLM), same run.

``python -m benchmarks.grpo_vs_trl`` (``--prompts/--group/--prompt-len/--new/--repeats``,
``--no-trl``). One step: sample ``group`` completions of ``new`` tokens for each of
``prompts`` random prompts of ``prompt-len`` tokens (temperature 1, no top-k/top-p), score them
with the same Python reward function on decoded text, group-normalised advantages, the GRPO
loss (sequence mean of token means, k3 KL to the frozen reference with beta 0.04, clip 0.2), one
AdamW update (constant lr, clipping 1.0). Defaults: 4 prompts x 4 = 16 completions of 64 tokens.

* Ours is the GRPO pipeline's iteration: ``pipelines.grpo.grpo_algorithm`` on the on-policy
  engine (``train.OnPolicyEngine``): its compiled ``rollout`` (sampler, then the reference's
  log-probs; with one update per rollout the policy is not scored again: ``reuse_logprobs``),
  the host reward functions on decoded text, and the compiled ``update``, exactly as
  ``engine.step`` runs them.
* TRL: ``GRPOTrainer.train()`` (transformers ``generate``, reference forward, reward, loss,
  backward, step), timed per step by a callback.

``ours_breakdown_s`` splits our step with ``block_until_ready`` between phases: the rollout
function's parts timed as separate jitted calls (generation, reference scoring, and, for
comparison, the policy scoring pass that ``reuse_logprobs`` saves),
host decode + reward, and the update; ``ours_compile_breakdown_s`` gives each part's first call
minus its steady state.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks._common import emit
from benchmarks._vs_trl import (SMALL_LLAMA, hf_tokenizer, load_ours, make_checkpoint,
                                make_step_clock, parse_args, r, random_prompts, summarize,
                                time_ours, trl_common_args, versions, word_text, write_tokenizer)
from rlhf_jax.data import Tokenizer
from rlhf_jax.models import score_completions
from rlhf_jax.pipelines.config import KLConfig
from rlhf_jax.pipelines.grpo import GRPOAlgorithmConfig, grpo_algorithm
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import Models, OnPolicyEngine, OptimizerConfig, Rewards, make_optimizer

LR, BETA = 1e-5, 0.04


def even_token_reward(prompts, completions, **_):
    """Fraction of completion words ``t<i>`` with even ``i`` (cheap, deterministic)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def ours(policy, params, tokenizer, prompts: np.ndarray, a, counter) -> dict:
    algo = grpo_algorithm(GRPOAlgorithmConfig(variant="grpo", group_size=a.group, epochs=1,
                                              num_minibatches=1),
                          KLConfig(coef=BETA, estimator="k3"), max_new_tokens=a.new)
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=1.0, n=a.group)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant",
                                               max_grad_norm=1.0), 1000)
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    rows = [{"prompt": word_text(p)} for p in prompts]
    engine = OnPolicyEngine(algo, Models(policy=policy, reference=policy), sampling=sampling,
                            optimizer=optimizer, rewards=Rewards(functions={
                                "even": even_token_reward}), tokenizer=tokenizer, rows=rows)
    mask = np.ones((a.prompts, a.prompt_len), bool)
    box = {"state": engine.init({"policy": params}, {"reference": ref_params}, seed=0),
           "i": 0, "phases": []}

    def step():  # engine.step with a clock between its three phases
        i = box["i"] % (len(prompts) // a.prompts)
        box["i"] += 1
        sl = slice(i * a.prompts, (i + 1) * a.prompts)
        t0 = time.perf_counter()
        s = box["state"]
        ro, rm, _ = engine.rollout_jit(s.params, s.rng, s.step, engine.frozen, prompts[sl], mask)
        jax.block_until_ready(ro)
        t1 = time.perf_counter()
        host, _ = engine.host_rewards(ro, np.arange(sl.start, sl.stop))
        t2 = time.perf_counter()
        box["state"], m = engine.update_jit(box["state"], engine.frozen, ro, host, rm)
        jax.block_until_ready(m["loss"])
        box["phases"].append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    res = time_ours(step, repeats=a.repeats, counter=counter)
    res["cache_sizes"] = {"rollout": engine.rollout_jit._cache_size(),
                          "update": engine.update_jit._cache_size()}
    first, rest = box["phases"][0], box["phases"][1:]
    med = [statistics.median(x) for x in zip(*rest)]
    res["breakdown"] = {"rollout_total": r(med[0]), "decode_and_reward_host": r(med[1]),
                        "update": r(med[2])}
    res["compile_breakdown"] = {"rollout": r(first[0] - med[0], 2),
                                "update": r(first[2] - med[2], 2)}
    res["breakdown"] |= rollout_parts(policy, box["state"].params["policy"], ref_params,
                                      sampling, prompts[:a.prompts], mask, a.repeats)
    return res


def rollout_parts(policy, params, ref_params, sampling, prompts, mask, repeats) -> dict:
    """The rollout's three parts as separate jitted calls (median of ``repeats``)."""
    sample = make_sampler(policy, sampling)
    score = jax.jit(lambda p, o: score_completions(policy, p, o.prompt_tokens, o.prompt_mask,
                                                   o.tokens, o.mask, temperature=1.0).logprobs)
    key = jax.random.PRNGKey(1)
    out = jax.block_until_ready(sample(params, prompts, mask, key))
    jax.block_until_ready(score(params, out))
    parts = {"rollout.generate": lambda: sample(params, prompts, mask, key),
             "saved.policy_logprobs": lambda: score(params, out),  # not in the rollout
             "rollout.reference_logprobs": lambda: score(ref_params, out)}
    res = {}
    for name, fn in parts.items():
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            runs.append(time.perf_counter() - t)
        res[name] = r(statistics.median(runs))
    return res


def theirs(ckpt: str, tok_dir: str, prompts: np.ndarray, a) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
    ds = datasets.Dataset.from_dict({"prompt": [word_text(p) for p in prompts]})
    clock = make_step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = TRLGRPOConfig(**trl_common_args(out, steps=1 + a.repeats, lr=LR,
                                               batch=a.prompts * a.group),
                             num_generations=a.group, max_completion_length=a.new,
                             temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=0.2,
                             num_iterations=1, loss_type="grpo", scale_rewards="group",
                             max_grad_norm=1.0, use_vllm=False, log_completions=False,
                             mask_truncated_completions=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[even_token_reward], args=args,
                              train_dataset=ds, processing_class=hf_tokenizer(tok_dir),
                              callbacks=[clock])
        trainer.train()
    return clock.step_seconds()


def main(argv=None) -> dict:
    a, counter, has_trl = parse_args(__doc__, argv, prompts=4, group=4, prompt_len=32, new=64,
                                     repeats=3)
    prompts = random_prompts(a.prompts * (a.repeats + 1), a.prompt_len)
    with tempfile.TemporaryDirectory() as d:
        tok_dir = write_tokenizer(f"{d}/tok", SMALL_LLAMA["vocab_size"])
        ckpt = make_checkpoint(f"{d}/policy") if has_trl else None
        model, params = load_ours(ckpt, heads=("lm",))
        mine = ours(model, params, Tokenizer.load(tok_dir), prompts, a, counter)
        trl_res = theirs(ckpt, tok_dir, prompts, a) if has_trl else None
    rec = {"benchmark": "grpo_vs_trl", "prompts": a.prompts, "group": a.group,
           "completions": a.prompts * a.group, "prompt_len": a.prompt_len, "new_tokens": a.new,
           "beta": BETA, "params": model.config.num_params(), "target_ratio": 5.0,
           "ours_cache_sizes": mine["cache_sizes"]}
    rec |= summarize(mine, trl_res, unit="s/step", work=1)
    rec |= {"ours_breakdown_s": mine["breakdown"],
            "ours_compile_breakdown_s": mine["compile_breakdown"], "versions": versions()}
    return emit(rec)


if __name__ == "__main__":
    main()
