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

``--real-shape`` (issue 18): the 135M-class checkpoint (``_common.REAL_135M``: 30 layers,
d_model 576, vocab 49152, tied; built by transformers, imported by us: the same weights both
sides) with a 49152-word tokenizer, 8 prompts x 4 of 32 tokens, 32 new tokens, ``--repeats 2``
by default (TRL's steps take tens of seconds each on a 2-core CPU). It also reports our memory:

* ``ours_memory_mib``: the compiled rollout's and update's ``memory_analysis`` (argument,
  output, alias = donated arguments reused as outputs, temp, and peak = argument + output -
  alias + temp; deterministic), and the bytes held between steps (state + frozen reference);
* ``ours_peak_rss_mib``: ``ru_maxrss`` read right after our timed steps, before anything else
  runs: TRL runs afterwards in a spawned process (``trl_peak_rss_mib``, that process's own
  ``ru_maxrss``, its ``import jax`` included) and torch builds the checkpoint in another, so
  neither counts here. ``rss_before_ours_mib`` is the resident set just before our side (the
  interpreter, jax and torch imports).

``--remat`` (default on with ``--real-shape``: same math, about a third more update compute)
recomputes the policy's blocks in the backward pass; ``--reference-dtype bfloat16`` holds the
frozen reference in bfloat16 (its log-probs stay float32). TRL's side is unchanged by both.

``ours_breakdown_s`` splits our step with ``block_until_ready`` between phases: the rollout
function's parts timed as separate jitted calls (generation, reference scoring, and, for
comparison, the policy scoring pass that ``reuse_logprobs`` saves),
host decode + reward, and the update; ``ours_compile_breakdown_s`` gives each part's first call
minus its steady state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks._common import REAL_135M, emit
from benchmarks._vs_trl import (SMALL_LLAMA, compiled_memory_mib, current_rss_mib, hf_tokenizer,
                                in_child, load_ours, make_checkpoint, make_step_clock,
                                parse_args, peak_rss_mib, r, random_prompts, summarize,
                                time_ours, trl_common_args, trl_stack, versions, word_text,
                                write_tokenizer)
from rlhf_jax.data import Tokenizer
from rlhf_jax.models import model_for, score_completions
from rlhf_jax.pipelines.config import KLConfig
from rlhf_jax.pipelines.grpo import GRPOAlgorithmConfig, grpo_algorithm
from rlhf_jax.sampling import SamplingConfig, make_sampler
from rlhf_jax.train import Models, OnPolicyEngine, OptimizerConfig, Rewards, make_optimizer

LR, BETA = 1e-5, 0.04
SMALL = dict(prompts=4, group=4, prompt_len=32, new=64, repeats=3)
REAL = dict(prompts=8, group=4, prompt_len=32, new=32, repeats=2)
"""``--real-shape``: issue 18's workload (8 prompts x 4, 32 new tokens) on ``REAL_135M``."""
FLAGS = (
    ("--real-shape", dict(action="store_true", help="the 135M-class checkpoint (REAL_135M) and "
                          "issue 18's workload; defaults --prompts 8 --new 32 --repeats 2")),
    ("--remat", dict(action=argparse.BooleanOptionalAction, default=None,
                     help="recompute the policy's blocks in the backward (default: on with "
                          "--real-shape, off otherwise)")),
    ("--reference-dtype", dict(choices=("float32", "bfloat16"), default="float32",
                               help="the frozen reference's parameter and compute dtype")),
)


def even_token_reward(prompts, completions, **_):
    """Fraction of completion words ``t<i>`` with even ``i`` (cheap, deterministic)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def reference_of(model, params, dtype: str):
    """The frozen reference: the policy's weights in ``dtype`` (the policy's own config but for
    ``remat``, which only matters where gradients flow)."""
    cfg = model.config.replace(remat=False)
    if dtype == "float32":
        return model_for(cfg), jax.tree.map(lambda x: x.copy(), params)
    return (model_for(cfg.replace(param_dtype=dtype, dtype=dtype)),
            jax.tree.map(lambda x: x.astype(dtype), params))


def program_memory(engine, state, prompts, mask) -> dict:
    """The compiled rollout and update programs' ``memory_analysis`` (MiB) on this workload,
    and the bytes held between steps (state and frozen params)."""
    args = (state.params, state.rng, state.step, engine.frozen, prompts, mask)
    rollout = engine.rollout_jit.lower(*args).compile()
    ro, rm, _ = rollout(*args)
    host = np.zeros(ro.truncated.shape, np.float32)  # the reward functions' sum, as timed
    update = engine.update_jit.lower(state, engine.frozen, ro, host, rm).compile()
    held = sum(x.nbytes for x in jax.tree.leaves((state, engine.frozen)))
    return {"rollout": compiled_memory_mib(rollout), "update": compiled_memory_mib(update),
            "held_between_steps": r(held / 2**20, 1)}


def ours(policy, params, reference, tokenizer, prompts: np.ndarray, a, counter) -> dict:
    algo = grpo_algorithm(GRPOAlgorithmConfig(variant="grpo", group_size=a.group, epochs=1,
                                              num_minibatches=1),
                          KLConfig(coef=BETA, estimator="k3"), max_new_tokens=a.new)
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=1.0, n=a.group)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant",
                                               max_grad_norm=1.0), 1000)
    ref_model, ref_params = reference
    rows = [{"prompt": word_text(p)} for p in prompts]
    engine = OnPolicyEngine(algo, Models(policy=policy, reference=ref_model), sampling=sampling,
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
    if a.real_shape:  # before anything else runs: our peak so far is the step's
        res["peak_rss_mib"] = r(peak_rss_mib(), 1)
        res["memory"] = program_memory(engine, box["state"], prompts[:a.prompts], mask)
    res["breakdown"] |= rollout_parts(policy, box["state"].params["policy"], reference,
                                      sampling, prompts[:a.prompts], mask, a.repeats)
    return res


def rollout_parts(policy, params, reference, sampling, prompts, mask, repeats) -> dict:
    """The rollout's three parts as separate jitted calls (median of ``repeats``)."""
    sample = make_sampler(policy, sampling)

    def scorer(model):
        return jax.jit(lambda p, o: score_completions(model, p, o.prompt_tokens, o.prompt_mask,
                                                      o.tokens, o.mask, temperature=1.0).logprobs)

    score, ref_score, ref_params = scorer(policy), scorer(reference[0]), reference[1]
    key = jax.random.PRNGKey(1)
    out = jax.block_until_ready(sample(params, prompts, mask, key))
    jax.block_until_ready((score(params, out), ref_score(ref_params, out)))
    parts = {"rollout.generate": lambda: sample(params, prompts, mask, key),
             "saved.policy_logprobs": lambda: score(params, out),  # not in the rollout
             "rollout.reference_logprobs": lambda: ref_score(ref_params, out)}
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
    trl_stack()  # torch's thread count, as in every benchmark
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
    real = "--real-shape" in (sys.argv[1:] if argv is None else argv)  # picks the defaults
    a, counter, has_trl = parse_args(__doc__, argv, flags=FLAGS, **(REAL if real else SMALL))
    a.remat = a.real_shape if a.remat is None else a.remat
    arch = REAL_135M if a.real_shape else SMALL_LLAMA
    prompts = random_prompts(a.prompts * (a.repeats + 1), a.prompt_len, arch["vocab_size"])
    with tempfile.TemporaryDirectory() as d:
        tok_dir = write_tokenizer(f"{d}/tok", arch["vocab_size"])
        # torch builds the checkpoint in its own process: none of it stays resident here
        ckpt = in_child(make_checkpoint, f"{d}/policy", arch=arch)[0] if has_trl else None
        rss_before = current_rss_mib()
        model, params = load_ours(ckpt, heads=("lm",), arch=arch)
        model = model_for(model.config.replace(remat=a.remat))
        reference = reference_of(model, params, a.reference_dtype)
        mine = ours(model, params, reference, Tokenizer.load(tok_dir), prompts, a, counter)
        del params, reference
        trl_res, trl_rss = (in_child(theirs, ckpt, tok_dir, prompts, a) if has_trl
                            else (None, None))
    rec = {"benchmark": "grpo_vs_trl", "real_shape": a.real_shape, "prompts": a.prompts,
           "group": a.group, "completions": a.prompts * a.group, "prompt_len": a.prompt_len,
           "new_tokens": a.new, "beta": BETA, "params": model.config.num_params(),
           "remat": a.remat, "reference_dtype": a.reference_dtype,
           "target_ratio": 3.0 if a.real_shape else 5.0, "ours_cache_sizes": mine["cache_sizes"]}
    rec |= summarize(mine, trl_res, unit="s/step", work=1)
    rec |= {"ours_breakdown_s": mine["breakdown"],
            "ours_compile_breakdown_s": mine["compile_breakdown"]}
    if a.real_shape:
        rec |= {"ours_memory_mib": mine["memory"], "ours_peak_rss_mib": mine["peak_rss_mib"],
                "rss_before_ours_mib": r(rss_before, 1), "trl_peak_rss_mib": r(trl_rss, 1)}
    return emit(rec | {"versions": versions()})


if __name__ == "__main__":
    main()
