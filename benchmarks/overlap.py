"""GRPO seconds per step with generation and training overlapped: ``python -m benchmarks.overlap``.

Three ways to run the same GRPO iteration on 8 devices (``XLA_FLAGS``'s virtual host devices
unless the machine has 8), in one run:

* ``sync_8``: on-policy, rollout and update on one mesh of all 8 devices (the default engine);
* ``sync_4_4``: on-policy, the rollout on a sub-mesh of the last 4 devices and the update on the
  first 4 (params copied to the rollout mesh, the rollout back, every step);
* ``one_step_off_4_4``: the same two sub-meshes, ``max_staleness=1``: step ``t + 1``'s rollout
  is dispatched with ``theta_t`` before update ``t`` runs (``train.overlap``), so on devices that
  really are separate the two programs run at the same time.

The workload (defaults; ``--prompts/--group/--prompt-len/--new/--steps/--hidden/--layers/
--vocab``): a small Llama (d_model 128, 2 layers, vocab 1024), 8 random prompts of 16 tokens x
4 samples = 32 completions of up to 32 new tokens (temperature 1), the reference's log-probs for
the k3 KL (beta 0.04), a Python reward function on decoded text (host work that overlaps too),
group advantages, one AdamW update per rollout (``reuse_logprobs``). Each configuration runs two
warm-up steps (compilation), then ``--steps`` steps timed together, blocking only at the end,
so the figure is steady-state seconds per step. After its timed steps the on-policy 4 + 4
engine times the rollout and the update alone (each blocked, ``phases_4_4_s``):
``ideal_one_step_off_s = max(rollout, update)`` is what perfect overlap would give.

On virtual CPU devices all 8 "devices" share the machine's cores, so there overlap can only
hide the host's reward work and dispatch gaps, and the sub-meshes' copies cost extra: the
ratios there measure overhead, not the gain on real accelerators (see ``benchmarks/README.md``,
"Overlapping generation and training"). Prints one JSON line (``emit``).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX initialises its backend (it does so lazily, at the first device query).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import emit  # noqa: E402
from benchmarks.grpo_vs_trl import even_token_reward  # noqa: E402
from rlhf_jax.models import ModelConfig, init_model  # noqa: E402
from rlhf_jax.parallel import MeshConfig, make_mesh  # noqa: E402
from rlhf_jax.pipelines.config import KLConfig  # noqa: E402
from rlhf_jax.pipelines.grpo import GRPOAlgorithmConfig, grpo_algorithm  # noqa: E402
from rlhf_jax.sampling import SamplingConfig  # noqa: E402
from rlhf_jax.train import (Models, OnPolicyEngine, OptimizerConfig, Rewards,  # noqa: E402
                            make_optimizer)
from rlhf_jax.types import PromptBatch  # noqa: E402

EOS, PAD = 1, 0


class _Words:
    """Token ``i`` decodes as the word ``t<i>`` (all ``decode_completions`` needs)."""

    eos_ids, pad_id = (EOS,), PAD

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def make_engine(a, policy, meshes, staleness: int) -> OnPolicyEngine:
    algo = grpo_algorithm(GRPOAlgorithmConfig(group_size=a.group),
                          KLConfig(coef=0.04, estimator="k3"), max_new_tokens=a.new)
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=(EOS,), pad_id=PAD,
                              temperature=1.0, n=a.group)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant"), 10**6)
    rows = [{"prompt": f"p{i}"} for i in range(a.prompts * 4)]
    return OnPolicyEngine(algo, Models(policy=policy, reference=policy), sampling=sampling,
                          optimizer=optimizer, tokenizer=_Words(), rows=rows,
                          rewards=Rewards(functions={"even": even_token_reward}),
                          mesh=meshes[0], rollout_mesh=meshes[1], max_staleness=staleness)


def batches(a, k: int) -> list:
    """``k`` batches cycling over 4 distinct sets of random prompts."""
    r = np.random.default_rng(0)
    tokens = r.integers(2, a.vocab, (4, a.prompts, a.prompt_len)).astype(np.int32)
    mask = np.ones((a.prompts, a.prompt_len), bool)
    return [(PromptBatch(tokens[i % 4], mask),
             np.arange(a.prompts, dtype=np.int32) + (i % 4) * a.prompts) for i in range(k)]


def measure(engine, params, a, *, phases: bool = False) -> dict:
    """Steady-state seconds per step (2 warm-up steps, then ``a.steps`` timed together); with
    ``phases`` (an on-policy engine) also the rollout and the update alone, each blocked."""
    state = engine.init({"policy": params}, {"reference": params}, seed=0,
                        prompt_shape=(a.prompts, a.prompt_len))
    bs = batches(a, 2 * a.steps + 3)
    for t in range(2):
        state, m = engine.step(state, bs[t], bs[t + 1])
    jax.block_until_ready((state, m))
    start = time.perf_counter()
    for t in range(2, 2 + a.steps):
        state, m = engine.step(state, bs[t], bs[t + 1])
    jax.block_until_ready((state, m))
    out = {"step_s": (time.perf_counter() - start) / a.steps}
    if phases:
        rollout, update = [], []
        for prompts, index in bs[2 + a.steps:2 + 2 * a.steps]:
            t0 = time.perf_counter()
            ro, rm, _ = jax.block_until_ready(engine.sample(state, state.step, prompts))
            t1 = time.perf_counter()
            state, m = jax.block_until_ready(engine.update(state, ro, rm, index))
            rollout.append(t1 - t0)
            update.append(time.perf_counter() - t1)
        out |= {"rollout_s": float(np.median(rollout)), "update_s": float(np.median(update))}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("prompts", 8), ("group", 4), ("prompt-len", 16), ("new", 32),
                          ("steps", 3), ("hidden", 128), ("layers", 2), ("vocab", 1024)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    devices = jax.devices()
    if len(devices) < 8:
        raise SystemExit(f"needs 8 devices, found {len(devices)} (set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count=8 on CPU)")
    devices = devices[:8]
    cfg = ModelConfig(family="llama", vocab_size=a.vocab, hidden_size=a.hidden,
                      intermediate_size=a.hidden * 3, num_layers=a.layers, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=256, tie_embeddings=False)
    policy, params = init_model(cfg, jax.random.PRNGKey(0))
    params = jax.device_get(params)
    whole = (make_mesh(MeshConfig(), devices), None)
    split = (make_mesh(MeshConfig(), devices[:4]), make_mesh(MeshConfig(), devices[4:]))
    t0 = time.perf_counter()
    split44 = measure(make_engine(a, policy, split, 0), params, a, phases=True)
    s = {"sync_8": measure(make_engine(a, policy, whole, 0), params, a)["step_s"],
         "sync_4_4": split44["step_s"],
         "one_step_off_4_4": measure(make_engine(a, policy, split, 1), params, a)["step_s"]}
    phases = {k: split44[k] for k in ("rollout_s", "update_s")}

    def r(x, n=4):
        return round(x, n)

    return emit({
        "benchmark": "overlap", "workload": {k: getattr(a, k) for k in vars(a)},
        "seconds_per_step": {k: r(v) for k, v in s.items()},
        "ratios": {"sync_4_4_over_sync_8": r(s["sync_4_4"] / s["sync_8"], 3),
                   "one_step_off_over_sync_8": r(s["one_step_off_4_4"] / s["sync_8"], 3),
                   "one_step_off_over_sync_4_4": r(s["one_step_off_4_4"] / s["sync_4_4"], 3)},
        "phases_4_4_s": {k: r(v) for k, v in phases.items()},
        "ideal_one_step_off_s": r(max(phases.values())),
        "wall_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
