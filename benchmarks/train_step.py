"""Training-step throughput and MFU: jitted forward+backward+AdamW vs PyTorch eager, same run.

``python -m benchmarks.train_step``. Same checkpoint, same batch of random tokens, next-token
NLL over every position, AdamW (lr 1e-5, weight decay 0.01). Our step is one ``jax.jit`` with
donated params and optimizer state. MFU is model FLOPs per second (6 x matmul params + attention,
per token, the PaLM appendix-B count) over this machine's float32 matmul peak, measured in the
same run as the best of several large ``jnp.dot`` calls.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import emit, shared_checkpoint, timed, torch_stack
from rlhf_jax import losses, ops


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 FLOP/s of an ``n x n @ n x n`` matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops_per_token(cfg, seq: int) -> float:
    """6 x (matmul parameters incl. the LM head) + 12 x layers x seq x attention width."""
    d, h = cfg.hidden_size, cfg.dim_per_head
    attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    matmul = cfg.num_layers * (attn + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size
    return 6 * matmul + 12 * cfg.num_layers * seq * cfg.num_heads * h


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    model, params, hf_model = shared_checkpoint()
    cfg = model.config
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(
        np.int32)
    opt = optax.adamw(1e-5, weight_decay=0.01)

    def loss_fn(p, t):
        logits = model.logits(p, model.apply(p, t[:, :-1]).hidden)
        total, count, _ = losses.sft_loss(ops.token_logprobs(logits, t[:, 1:]),
                                          jnp.ones(t[:, 1:].shape))
        return total / count

    def _step(p, o, t):
        loss, g = jax.value_and_grad(loss_fn)(p, t)
        updates, o = opt.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    step = jax.jit(_step, donate_argnums=(0, 1))
    state = {"p": params, "o": opt.init(params)}

    def ours():
        state["p"], state["o"], loss = step(state["p"], state["o"], tokens)
        jax.block_until_ready(loss)

    first, t_ours = timed(ours, repeats=a.repeats)
    n_tok = a.batch * (a.seq - 1)
    peak = matmul_peak_flops()
    achieved = model_flops_per_token(cfg, a.seq) * n_tok / t_ours
    rec = {"benchmark": "train_step", "batch": a.batch, "seq": a.seq, "d_model": cfg.hidden_size,
           "params": cfg.num_params(), "ours_tokens_per_s": round(n_tok / t_ours, 1),
           "ours_compile_s": round(first - t_ours, 2),
           "achieved_gflops": round(achieved / 1e9, 1), "matmul_peak_gflops": round(peak / 1e9, 1),
           "mfu_vs_measured_peak": round(achieved / peak, 3)}
    torch, _ = torch_stack()
    if hf_model is not None:
        hf_model.train()
        t_opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-5, weight_decay=0.01)
        ids = torch.as_tensor(tokens, dtype=torch.long)

        def theirs():
            out = hf_model(ids, labels=ids)
            out.loss.backward()
            t_opt.step()
            t_opt.zero_grad(set_to_none=True)

        _, t_theirs = timed(theirs, repeats=a.repeats)
        rec["torch_eager_tokens_per_s"] = round(n_tok / t_theirs, 1)
        rec["ratio_ours_over_torch"] = round(t_theirs / t_ours, 2)
    return emit(rec)


if __name__ == "__main__":
    main()
