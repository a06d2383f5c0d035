"""LoRA against full fine-tuning: peak memory and step time of a DPO step and a GRPO step.

``python -m benchmarks.lora`` (``--rank``, ``--pairs``, ``--length``, ``--prompts``,
``--group``, ``--new``, ``--repeats``). The model is the 135M-class Llama shape (30 layers,
d_model 576, SwiGLU 1536, 9 heads / 3 KV heads, vocabulary 49152, tied) with random weights.

* DPO step: one AdamW update on ``pairs`` preference pairs of ``length`` tokens (sigmoid DPO,
  beta 0.1, reference log-probs given), the trainer's compiled step (``train.make_train_step``):
  full weights, LoRA rank ``rank`` on every block linear (``train.adapters.lora_loss``, the frozen
  base passed as the step's frozen arrays), and QLoRA with an int8 and an NF4 base.
* GRPO step: the on-policy engine's iteration (``engine.step``: compiled rollout, host reward on
  decoded text, compiled update) on ``prompts`` x ``group`` completions of ``new`` tokens, k3 KL
  to the reference (full: a second copy of the weights; LoRA: the base with the adapter off).

Peak memory is XLA's accounting of each compiled program: arguments (state, frozen arrays, batch)
+ temporaries + outputs not aliased to a donated argument (``compiled.memory_analysis()``); for
GRPO the larger of the rollout and the update. Step time is the median of ``repeats`` calls after
a warm-up call, LoRA and full in the same run. Targets (issue 16): LoRA peak <= 40% of full and
LoRA step >= 1.3x faster. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import REAL_135M as REAL_135M_ARCH, emit, program_peak_bytes
from benchmarks._vs_trl import write_tokenizer
from rlhf_jax.data import Tokenizer
from rlhf_jax.losses import dpo_loss
from rlhf_jax.models import (LoraConfig, ModelConfig, init_model, remat_compiler_options,
                             sequence_logprob_sums)
from rlhf_jax.pipelines.config import KLConfig
from rlhf_jax.pipelines.grpo import GRPOAlgorithmConfig, grpo_algorithm
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import (Models, OnPolicyEngine, OptimizerConfig, Rewards,
                            create_train_state, make_optimizer, make_train_step)
from rlhf_jax.train.adapters import adapt, lora_loss
from rlhf_jax.types import PromptBatch, TokenBatch

REAL_135M = ModelConfig(family="llama", **REAL_135M_ARCH)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _pairs(n: int, length: int, vocab: int, seed: int = 0):
    r = np.random.default_rng(seed)
    tokens = r.integers(2, vocab, size=(2 * n, length)).astype(np.int32)
    mask = np.ones((2 * n, length), bool)
    loss_mask = np.zeros((2 * n, length), bool)
    loss_mask[:, length // 2:] = True
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    both = TokenBatch(tokens=tokens, loss_mask=loss_mask, attention_mask=mask,
                      segment_ids=np.zeros_like(tokens), positions=positions)
    ref = r.normal(size=(2, n)).astype(np.float32) - 50.0
    return both, ref


def dpo_step(model, params, a, lora: LoraConfig | None) -> dict:
    both, ref = _pairs(a.pairs, a.length, model.config.vocab_size)

    def loss_fn(p, batch, key):
        del key
        logps, _ = sequence_logprob_sums(model_used, p, batch)
        n = a.pairs
        return dpo_loss(logps[:n], logps[n:], jnp.asarray(ref[0]), jnp.asarray(ref[1]),
                        beta=0.1)

    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6, schedule="constant"), 100)
    model_used, frozen, loss = model, None, loss_fn
    trained = jax.tree.map(jnp.copy, params)  # the step donates its state
    if lora is not None:
        adapted, trained = adapt(model, params, lora, jax.random.PRNGKey(1))
        model_used, frozen = adapted.model, adapted.base
        loss = lora_loss(loss_fn, adapted, has_frozen=False, train=True)
    state = create_train_state(trained, optimizer, seed=0)
    peak = program_peak_bytes(_lowered(loss, optimizer, state, both, frozen))
    step = make_train_step(loss, optimizer, frozen=frozen)
    box = {"state": state}

    def run():
        box["state"], m = step(box["state"], both)
        jax.block_until_ready(m["loss"])

    return {"peak_mib": round(peak / 2**20, 1), "step_s": round(_median_s(run, a.repeats), 3)}


def _lowered(loss, optimizer, state, batch, frozen):
    """The train step compiled on its own, for its memory analysis (same function as
    ``make_train_step`` builds, with the state donated)."""
    from rlhf_jax.train.step import accumulate, guarded_update

    def step(state, batch, frozen_args):
        fn = loss if frozen_args is None else (lambda p, b, k: loss(p, b, k, frozen_args))
        grads, total, count, _ = accumulate(fn, state.params, batch, jax.random.PRNGKey(0), 1)
        params, opt, _, _, _ = guarded_update(optimizer, state.params, state.opt_state, grads,
                                              total, count)
        return state._replace(params=params, opt_state=opt)

    return jax.jit(step, donate_argnums=(0,), compiler_options=remat_compiler_options()).lower(
        state, batch, frozen).compile()


def grpo_step(model, params, a, tokenizer, lora: LoraConfig | None) -> dict:
    algo = grpo_algorithm(GRPOAlgorithmConfig(variant="grpo", group_size=a.group),
                          KLConfig(coef=0.04, estimator="k3"), max_new_tokens=a.new)
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=tokenizer.eos_ids,
                              pad_id=tokenizer.pad_id, temperature=1.0, n=a.group)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6, schedule="constant"), 100)
    r = np.random.default_rng(0)
    prompts = r.integers(2, model.config.vocab_size, size=(a.prompts, 32)).astype(np.int32)
    rows = [{"prompt": " ".join(f"t{i}" for i in p)} for p in prompts]
    rewards = Rewards(functions={"len": lambda prompts, completions, **_: [
        len(c.split()) / 10 for c in completions]})
    if lora is None:
        models = Models(policy=model, reference=model)
        trained = {"policy": jax.tree.map(jnp.copy, params)}  # donated by the update
        frozen = {"reference": jax.tree.map(jnp.copy, params)}
    else:
        adapted, tr = adapt(model, params, lora, jax.random.PRNGKey(1))
        ref_model, of_base = adapted.reference
        models = Models(policy=adapted.model, reference=ref_model, lora=True,
                        reference_of_base=of_base)
        trained, frozen = {"policy": tr}, {"base": adapted.base}
    engine = OnPolicyEngine(algo, models, sampling=sampling, optimizer=optimizer,
                            rewards=rewards, tokenizer=tokenizer, rows=rows)
    state = engine.init(trained, frozen, seed=0)
    mask = np.ones(prompts.shape, bool)
    index = np.arange(a.prompts, dtype=np.int32)
    batch = (PromptBatch(tokens=prompts, mask=mask), index)
    box = {"state": state}

    def run():
        box["state"], m = engine.step(box["state"], batch)
        jax.block_until_ready(m["loss"])

    step_s = _median_s(run, a.repeats)
    s = box["state"]
    args = (s.params, s.rng, s.step, engine.frozen, prompts, mask)
    ro, rm, _ = engine.rollout_jit(*args)
    update = engine.update_jit.lower(s, engine.frozen, ro, jnp.zeros(ro.truncated.shape), rm)
    peak = max(program_peak_bytes(engine.rollout_jit.lower(*args).compile()),
               program_peak_bytes(update.compile()))
    return {"peak_mib": round(peak / 2**20, 1), "step_s": round(step_s, 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=REAL_135M.num_layers,
                   help="fewer layers for a quick check (the figures are for 30)")
    p.add_argument("--no-remat", action="store_true",
                   help="keep every activation for the backward (default: remat each block, "
                        "as memory-bound post-training runs do, for both sides)")
    p.add_argument("--skip-grpo", action="store_true")
    a = p.parse_args(argv)
    config = REAL_135M.replace(num_layers=a.layers, remat=not a.no_remat)
    model, params = init_model(config, jax.random.PRNGKey(0))
    lora = LoraConfig(rank=a.rank, alpha=2.0 * a.rank)
    out = {"benchmark": "lora", "model": "135M-class llama (random weights)",
           "layers": a.layers, "remat": config.remat,
           "params_m": round(config.num_params() / 1e6, 1),
           "rank": a.rank,
           "dpo": {"shape": f"{a.pairs} pairs x {a.length} tokens",
                   "full": dpo_step(model, params, a, None),
                   "lora": dpo_step(model, params, a, lora)}}
    for mode in ("int8", "nf4"):
        q = LoraConfig(rank=a.rank, alpha=2.0 * a.rank, quantize_base=mode)
        out["dpo"][f"qlora_{mode}"] = dpo_step(model, params, a, q)
    if not a.skip_grpo:
        with tempfile.TemporaryDirectory() as d:
            tok = Tokenizer.load(write_tokenizer(d, config.vocab_size))
            out["grpo"] = {"shape": f"{a.prompts} prompts x {a.group}, {a.new} new tokens",
                           "full": grpo_step(model, params, a, tok, None),
                           "lora": grpo_step(model, params, a, tok, lora)}
    for k in ("dpo", "grpo"):
        if k in out:
            full, ours = out[k]["full"], out[k]["lora"]
            out[k]["lora_peak_frac"] = round(ours["peak_mib"] / full["peak_mib"], 3)
            out[k]["lora_speedup"] = round(full["step_s"] / ours["step_s"], 3)
    return emit(out)


if __name__ == "__main__":
    main()
