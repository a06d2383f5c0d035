"""Rollout throughput: our jitted KV-cached sampler vs transformers' ``generate``, same run.

``python -m benchmarks.generation`` (add ``--batch/--prompt/--new`` to change the workload).
Both sample with temperature 1, no top-k/top-p, exactly ``new`` tokens per row (no EOS), from
the same checkpoint and the same left-padded prompts. Compile time is reported separately and
excluded from tokens/s; each side's figure is the median of ``--repeats`` timed runs.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks._common import emit, shared_checkpoint, timed, torch_stack
from rlhf_jax.sampling import SamplingConfig, make_sampler


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    model, params, hf_model = shared_checkpoint()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, vocab, (a.batch, a.prompt)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    cfg = SamplingConfig(max_new_tokens=a.new, eos_ids=(vocab,), pad_id=0, temperature=1.0)
    sampler = make_sampler(model, cfg)
    key = jax.random.PRNGKey(0)
    first, ours = timed(lambda: jax.block_until_ready(sampler(params, prompts, mask, key)),
                        repeats=a.repeats)
    tokens = a.batch * a.new
    rec = {"benchmark": "generation", "batch": a.batch, "prompt": a.prompt, "new_tokens": a.new,
           "params": model.config.num_params(), "ours_tokens_per_s": round(tokens / ours, 1),
           "ours_compile_s": round(first - ours, 2)}
    torch, _ = torch_stack()
    if hf_model is not None:
        ids = torch.as_tensor(prompts, dtype=torch.long)
        att = torch.ones_like(ids)

        def hf_generate():
            with torch.no_grad():
                hf_model.generate(ids, attention_mask=att, do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=a.new,
                                  min_new_tokens=a.new, use_cache=True, pad_token_id=0)

        _, theirs = timed(hf_generate, repeats=a.repeats)
        rec["transformers_tokens_per_s"] = round(tokens / theirs, 1)
        rec["ratio_ours_over_transformers"] = round(theirs / ours, 2)
        rec["torch_threads"] = torch.get_num_threads()
    return emit(rec)


if __name__ == "__main__":
    main()
