"""One rank of the multi-process test (``test_multiprocess.py``), also usable by hand:

    RLHF_JAX_COORDINATOR=127.0.0.1:12355 RLHF_JAX_NUM_PROCESSES=2 RLHF_JAX_PROCESS_ID=0 \\
        python -m tests.parallel.multiprocess_worker DATA_DIR OUT_DIR LOCAL_DEVICES

Runs a few SFT steps and a few GRPO steps (sampling included, with a greedy evaluation on held-out
prompts at steps 0 and 3) on a ``data=2 x fsdp=2`` mesh over all the processes' devices, then
writes what this process sees into ``OUT_DIR/rank{process_index}.npz``: the final parameters
(gathered) and the per-step train and eval metrics that the run's ``metrics.jsonl`` holds.
Without the ``RLHF_JAX_*`` variables it is the one-process reference run.
"""

from __future__ import annotations

import dataclasses
import os
import sys


def _length(prompts, completions, **columns):
    """A dense reward (exact match is ~0 for an untrained model) so advantages are not zero."""
    return [len(c) / 10.0 for c in completions]


def main(data_dir: str, out_dir: str, local_devices: int) -> None:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        kept + [f"--xla_force_host_platform_device_count={local_devices}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from rlhf_jax.parallel import initialize_distributed

    initialize_distributed()  # before anything touches a device

    import jax
    import numpy as np

    from rlhf_jax.parallel import MeshConfig, fetch
    from rlhf_jax.pipelines import (DataConfig, GenerationConfig, KLConfig, LoggingConfig,
                                    LoopConfig, ModelSpec, OptimizerConfig, grpo, sft)
    from rlhf_jax.rewards.verifiers import exact_match_reward
    from rlhf_jax.train import read_jsonl_metrics

    assert jax.device_count() == 4, jax.devices()
    mesh = MeshConfig(data=2, fsdp=2)
    model = ModelSpec(preset="toy-1m", overrides={"hidden_size": 32, "intermediate_size": 64,
                                                  "num_layers": 1, "num_heads": 4,
                                                  "num_kv_heads": 2})
    opt = OptimizerConfig(learning_rate=1e-2, schedule="constant")
    loop = LoopConfig(total_steps=3, log_every=1, save_every=3)
    logging = LoggingConfig(progress=True, tensorboard=False)
    tok = os.path.join(data_dir, "tokenizer")
    sft_out = sft.run(sft.SFTConfig(
        data=DataConfig(train=os.path.join(data_dir, "sft.jsonl"), max_length=32, batch_size=8,
                        packing=True, on_overflow="truncate"),
        tokenizer=tok, model=model, output_dir=os.path.join(out_dir, "sft"), optimizer=opt,
        loop=loop, logging=logging, mesh=mesh))
    grpo_out = grpo.run(grpo.GRPOConfig(
        data=DataConfig(train=os.path.join(data_dir, "train_prompts.jsonl"),
                        eval=os.path.join(data_dir, "eval_prompts.jsonl"),
                        max_prompt_length=16, batch_size=4),
        tokenizer=tok, policy=ModelSpec(path=sft_out["model_dir"]),
        output_dir=os.path.join(out_dir, "grpo"), sampling=GenerationConfig(max_new_tokens=4),
        algorithm=grpo.GRPOAlgorithmConfig(group_size=2, num_minibatches=2),
        kl=KLConfig(coef=0.05), optimizer=opt, loop=dataclasses.replace(loop, eval_every=3),
        logging=logging, mesh=mesh),
        reward_fns={"exact_match": exact_match_reward, "length": _length})

    arrays = {}
    for stage, out in (("sft", sft_out), ("grpo", grpo_out)):
        params = fetch(out["state"].params)  # every process joins the gather
        for path, x in jax.tree_util.tree_leaves_with_path(params):
            arrays[f"{stage}/param{jax.tree_util.keystr(path)}"] = np.asarray(x)
        logged = read_jsonl_metrics(os.path.join(out["run_dir"], "metrics.jsonl"))
        for split in ("train", "eval"):
            rows = [r for r in logged if r["split"] == split]
            if not rows:
                continue
            keys = sorted(k for k in rows[0] if k not in ("split", "step", "time")
                          and not k.endswith(("per_s", "seconds")))  # timings differ
            arrays[f"{stage}/{split}_steps"] = np.array([r["step"] for r in rows])
            for k in keys:
                arrays[f"{stage}/metric/{split}/{k}"] = np.array([r[k] for r in rows],
                                                                 np.float64)
    np.savez(os.path.join(out_dir, f"rank{jax.process_index()}.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
