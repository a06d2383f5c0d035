"""Peak memory and time of chunked vs plain token log-probs.

``python -m benchmarks.logprob_memory``.

The incumbent is the plain form: ``token_logprobs(hidden @ unembed, targets)``, which
materialises ``[B, T, V]`` logits (and their float32 softmax in the backward pass). The chunked
form never does. Peak memory is XLA's own accounting of the compiled program (temporaries plus
outputs, ``compiled.memory_analysis()``; the inputs ``hidden`` and ``unembed`` are the same for
both and reported once as ``input_mib``), for the forward pass and for ``value_and_grad``.
Prints one JSON line with both figures and their ratio; the target is chunked <= 25% of plain at
V = 128k (the default shape).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from rlhf_jax.ops import chunked_token_logprobs, token_logprobs


def _peak_bytes(fn, *args) -> tuple[int, object]:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        raise SystemExit("this backend reports no memory analysis")
    return int(mem.temp_size_in_bytes + mem.output_size_in_bytes), compiled


def _time(compiled, *args, repeats: int = 3) -> float:
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk_t", type=int, default=128)
    p.add_argument("--chunk_v", type=int, default=4096)
    a = p.parse_args(argv)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k[0], (a.batch, a.seq, a.dim), jnp.float32)
    w = jax.random.normal(k[1], (a.dim, a.vocab), jnp.float32) / a.dim**0.5
    y = jax.random.randint(k[2], (a.batch, a.seq), 0, a.vocab)

    def plain(h, w):
        return token_logprobs(h @ w, y).sum()

    def chunked(h, w):
        return chunked_token_logprobs(h, w, y, chunk_t=a.chunk_t, chunk_v=a.chunk_v).sum()

    out = {"benchmark": "logprob_memory", "backend": jax.default_backend(),
           "shape": {"B": a.batch, "T": a.seq, "V": a.vocab, "D": a.dim},
           "chunks": {"t": a.chunk_t, "v": a.chunk_v},
           "input_mib": round((h.size + w.size) * 4 / 2**20, 2)}
    for label, wrap in (("forward", lambda f: f), ("value_and_grad",
                                                   lambda f: jax.value_and_grad(f, (0, 1)))):
        pb, pc = _peak_bytes(wrap(plain), h, w)
        cb, cc = _peak_bytes(wrap(chunked), h, w)
        out[label] = {
            "plain_peak_mib": round(pb / 2**20, 2), "chunked_peak_mib": round(cb / 2**20, 2),
            "chunked_over_plain": round(cb / pb, 4),
            "plain_s": round(_time(pc, h, w), 4), "chunked_s": round(_time(cc, h, w), 4),
        }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
