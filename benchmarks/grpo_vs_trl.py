"""GRPO seconds per step: our rollout + update vs TRL ``GRPOTrainer`` (no vLLM), same run.

``python -m benchmarks.grpo_vs_trl`` (``--prompts/--group/--prompt-len/--new/--repeats``,
``--no-trl``). One step: sample ``group`` completions of ``new`` tokens for each of
``prompts`` random prompts of ``prompt-len`` tokens (temperature 1, no top-k/top-p), score them
with the same Python reward function on decoded text, group-normalised advantages, the GRPO
loss (sequence mean of token means, k3 KL to the frozen reference with beta 0.04, clip 0.2), one
AdamW update (constant lr, clipping 1.0). Defaults: 4 prompts x 4 = 16 completions of 64 tokens.

* Ours is the GRPO pipeline's iteration (``pipelines/grpo.py``): ``make_grpo_functions``'s
  ``rollout`` (sampler, then the reference's log-probs; with one update per rollout the policy
  is not scored again: ``reuse_logprobs``) and ``update``, each
  jitted as ``run`` does, with ``decode_completions`` and ``call_reward_fns`` in between (the
  body of ``run``'s ``step_fn``, which is local to ``run``).
* TRL: ``GRPOTrainer.train()`` (transformers ``generate``, reference forward, reward, loss,
  backward, step), timed per step by a callback.

``ours_breakdown_s`` splits our step with ``block_until_ready`` between phases: the rollout
function's parts timed as separate jitted calls (generation, reference scoring, and, for
comparison, the policy scoring pass that ``reuse_logprobs`` saves),
host decode + reward, and the update; ``ours_compile_breakdown_s`` gives each part's first call
minus its steady state.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import emit
from benchmarks._vs_trl import (SMALL_LLAMA, CompileCounter, hf_tokenizer, load_ours,
                                make_checkpoint, make_step_clock, r, summarize, time_ours,
                                trl_common_args, trl_stack, versions, word_text, write_tokenizer)
from rlhf_jax.data import Tokenizer
from rlhf_jax.models import score_completions
from rlhf_jax.pipelines.common import ModelSpec
from rlhf_jax.pipelines.grpo import GRPOConfig, make_grpo_functions
from rlhf_jax.pipelines.rollouts import call_reward_fns, decode_completions
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import OptimizerConfig, create_train_state, make_optimizer

LR, BETA = 1e-5, 0.04


def even_token_reward(prompts, completions, **_):
    """Fraction of completion words ``t<i>`` with even ``i`` (cheap, deterministic)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def ours(policy, params, tokenizer, prompts: np.ndarray, a, counter) -> dict:
    opt_cfg = OptimizerConfig(learning_rate=LR, schedule="constant", total_steps=1000,
                              max_grad_norm=1.0)
    cfg = GRPOConfig(prompts="-", tokenizer="-", policy=ModelSpec(), variant="grpo",
                     max_prompt_length=a.prompt_len, max_new_tokens=a.new, temperature=1.0,
                     prompts_per_step=a.prompts, group_size=a.group, num_iterations=1,
                     num_minibatches=1, kl_coef=BETA, kl_estimator="k3", optimizer=opt_cfg)
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=1.0, n=a.group)
    optimizer = make_optimizer(opt_cfg)
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    rollout, update = make_grpo_functions(cfg, policy, policy, sampling, optimizer)
    rollout_jit, update_jit = jax.jit(rollout), jax.jit(update, donate_argnums=(0,))
    mask = np.ones((a.prompts, a.prompt_len), bool)
    texts = [word_text(p) for p in prompts]
    box = {"state": create_train_state(params, optimizer, seed=0), "i": 0, "phases": []}

    def step():
        i = box["i"] % (len(prompts) // a.prompts)
        box["i"] += 1
        sl = slice(i * a.prompts, (i + 1) * a.prompts)
        t0 = time.perf_counter()
        out, old, ref, diff = rollout_jit(box["state"], ref_params, prompts[sl], mask)
        jax.block_until_ready(ref)
        t1 = time.perf_counter()
        done = decode_completions(tokenizer, out.tokens, out.mask)
        rep = [t for t in texts[sl] for _ in range(a.group)]
        scores = call_reward_fns({"even": even_token_reward}, rep, done, {})
        t2 = time.perf_counter()
        box["state"], m = update_jit(box["state"], out, old, ref,
                                     jnp.asarray(scores["even"], jnp.float32))
        jax.block_until_ready(m["loss"])
        box["phases"].append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    res = time_ours(step, repeats=a.repeats, counter=counter)
    res["cache_sizes"] = {"rollout": rollout_jit._cache_size(), "update": update_jit._cache_size()}
    first, rest = box["phases"][0], box["phases"][1:]
    med = [statistics.median(x) for x in zip(*rest)]
    res["breakdown"] = {"rollout_total": r(med[0]), "decode_and_reward_host": r(med[1]),
                        "update": r(med[2])}
    res["compile_breakdown"] = {"rollout": r(first[0] - med[0], 2),
                                "update": r(first[2] - med[2], 2)}
    res["breakdown"] |= rollout_parts(policy, box["state"].params, ref_params, sampling,
                                      prompts[:a.prompts], mask, a.repeats)
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-trl", action="store_true", help="run our side only")
    a = p.parse_args(argv)
    counter = CompileCounter()
    has_trl = trl_stack()[0] is not None and not a.no_trl
    vocab = SMALL_LLAMA["vocab_size"]
    prompts = np.random.default_rng(0).integers(2, vocab, (a.prompts * (a.repeats + 1),
                                                            a.prompt_len)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        tok_dir = write_tokenizer(f"{d}/tok", vocab)
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
