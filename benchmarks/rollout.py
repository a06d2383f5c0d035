"""Rollout speed at the real 135M-class shape: our sampler against transformers ``generate``,
the machine's bandwidth bound, and where a decode step's time goes, all in one run.

``python -m benchmarks.rollout`` (``--batches 8 32``, ``--prompt``, ``--new``, ``--repeats``,
``--layers``). The model is the 135M-class Llama (30 layers, d_model 576, SwiGLU 1536, 9 / 3
heads, vocabulary 49152, tied) with random weights, made by transformers when it is installed
(and imported by us, so both sides run the same checkpoint) and initialised by us otherwise.

Per batch size, two workloads, temperature 0.7, no top-k / top-p, random prompts of ``prompt``
tokens:

* ``fixed``: exactly ``new`` tokens per row (no EOS can occur).
* ``eos``: stop at EOS, where the EOS set is 1/32 of the vocabulary (random weights give a
  near-uniform next-token distribution, so rows end after ~32 tokens on average, at different
  steps, as real completions do). Tokens/s counts the tokens up to and including each row's EOS.
* ``top_p``: as ``fixed``, with nucleus sampling at top-p 0.9 on both sides (a checkpoint's
  ``generation_config.json`` often sets it, and the stages apply it).

Figures: tokens/s of both sides (median of ``repeats`` timed runs after a warm-up); the
bandwidth bound ``weight bytes / read bandwidth``, the bandwidth measured in the same run as the
best of XLA's and NumPy's (2 threads) streaming sum over a 512 MiB buffer, so the bound is in
tokens/s at that batch (``batch / bound seconds per step``) and ours is a fraction of it; and a
decode step split into its parts, each timed as its own compiled program at the decode shape
(``ms_per_step``): the blocks (30 layers with their cache update), the LM head, sampling, the
cache update alone, and the whole step as the sampler's loop body runs it. ``filter_ms``: top-k
(50) and top-p (0.9) filtering at ``[batch, vocab]``, the sampler's bisection thresholds against
the sort it used before. ``matmul_ceiling``: the GB/s at which dense f32 matmuls with ``batch``
rows read the model's weights (XLA and NumPy, same run), and ``ceiling_fraction_of_bound``, the
best of them over the read bandwidth: no f32 decode step built on these GEMMs gets closer.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import REAL_135M, emit, shared_checkpoint, timed, torch_stack
from rlhf_jax.ops.logprobs import NEG_INF
from rlhf_jax.sampling import SamplingConfig, filter_logits, make_sampler
from rlhf_jax.sampling.sampler import _choose


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> dict:
    """Streaming read bandwidth (bytes/s): XLA's sum and NumPy's sum on 2 threads."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    _, xla_s = timed(lambda: jax.block_until_ready(total(x)), repeats=repeats)
    host = np.ones((nbytes // 4,), np.float32)
    halves = np.array_split(host, 2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        _, np_s = timed(lambda: list(pool.map(np.sum, halves)), repeats=repeats)
    return {"xla_gb_s": round(nbytes / xla_s / 1e9, 1), "numpy_gb_s": round(nbytes / np_s / 1e9, 1),
            "best_bytes_per_s": nbytes / min(xla_s, np_s)}


def _median_ms(fn, args, donate: int | None = None, repeats: int = 7) -> float:
    """Median ms of a jitted ``fn(*args)``; with ``donate`` that argument is donated and the
    output's same-position value is fed back (as the decode loop does with the cache)."""
    jitted = jax.jit(fn, donate_argnums=() if donate is None else (donate,))
    args = list(args)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        out = jax.block_until_ready(jitted(*args))
        if i:
            times.append(time.perf_counter() - t)
        if donate is not None:
            args[donate] = out[0] if isinstance(out, tuple) else out
    return round(1e3 * statistics.median(times), 2)


def sorted_filter(z, *, top_k: int | None, top_p: float | None):
    """The sampler's top-k / top-p filter before it bisected its thresholds: ``lax.top_k`` and a
    full sort of the vocabulary (kept here to time against ``filter_logits``)."""
    if top_k is not None:
        z = jnp.where(z < jax.lax.top_k(z, top_k)[0][:, -1:], NEG_INF, z)
    if top_p is not None:
        order = jnp.argsort(-z, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(z, order, axis=-1), axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(z.shape[0])[:, None], order].set(
            keep_sorted)
        z = jnp.where(keep, z, NEG_INF)
    return z


def filter_split(batch: int, vocab: int) -> dict:
    """ms of one decode step's top-k (50) and top-p (0.9) filtering at ``[batch, vocab]``: the
    bisection thresholds (``filter_logits``) against the sorting implementation."""
    z = jax.random.normal(jax.random.PRNGKey(0), (batch, vocab), jnp.float32) * 3
    out = {}
    for name, kw in {"top_k_50": dict(top_k=50, top_p=None),
                     "top_p_0.9": dict(top_k=None, top_p=0.9)}.items():
        out[name] = {"bisect": _median_ms(lambda z: filter_logits(z, **kw), (z,)),
                     "sort": _median_ms(lambda z: sorted_filter(z, **kw), (z,))}
        out[name]["speedup"] = round(out[name]["sort"] / out[name]["bisect"], 1)
    return out


def matmul_ceiling(params, batch: int, repeats: int = 5) -> dict:
    """How fast dense f32 matmuls with ``batch`` rows read this model's weights: every weight
    matrix of the blocks and the tied LM head, chained as a decode step uses them (x @ W per
    matrix, the activations kept at ``batch`` rows), timed as one XLA program and in NumPy
    (OpenBLAS on the same cores). Their GB/s bound what any f32 decode step built on these GEMMs
    can reach, whatever the loop around them does."""
    layers = [params["layers"][i] for i in range(len(params["layers"]))]
    names = [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
             ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]
    mats = [lay[a][b]["kernel"] for lay in layers for a, b in names]
    head = params["embed"]["embedding"]  # [V, D], read as x @ E.T
    nbytes = sum(m.nbytes for m in mats) + head.nbytes

    def chain(mats, head, x):
        total = jnp.zeros((), jnp.float32)
        for m in mats:  # each matrix reads a [batch, rows] slice of one running activation
            y = x[:, : m.shape[0]] @ m
            total, x = total + y[0, 0], jnp.tile(y, (1, -(-x.shape[1] // y.shape[1])))
        return total + jnp.sum(x[:, : head.shape[1]] @ head.T)

    x = jnp.ones((batch, max(m.shape[0] for m in mats)), jnp.float32)
    xla_ms = _median_ms(chain, (mats, head, x), repeats=repeats)
    np_mats, np_head, xn = [np.asarray(m) for m in mats], np.asarray(head), np.asarray(x)

    def numpy_chain():
        h = xn
        for m in np_mats:
            y = h[:, : m.shape[0]] @ m
            h = np.tile(y, (1, -(-h.shape[1] // y.shape[1])))
        return h[:, : np_head.shape[1]] @ np_head.T

    _, np_s = timed(numpy_chain, repeats=repeats)
    return {"xla_ms": xla_ms, "numpy_ms": round(np_s * 1e3, 2),
            "xla_gb_s": round(nbytes / xla_ms / 1e6, 1),
            "numpy_gb_s": round(nbytes / np_s / 1e9, 1)}


def decode_split(model, params, batch: int, length: int, sampling: SamplingConfig) -> dict:
    """ms per decode step and its parts, each its own compiled program at the decode shape."""
    cache = model.init_cache(batch, length)
    prompt = jnp.ones((batch, length // 2), jnp.int32)
    cache = jax.jit(lambda p, t, c: model.apply(p, t, cache=c).cache)(params, prompt, cache)
    tok = jnp.ones((batch, 1), jnp.int32)
    valid = jnp.ones((batch, 1), bool)
    key = jax.random.PRNGKey(0)
    hidden = jnp.ones((batch, 1, model.config.hidden_size), jnp.float32)
    logits = jnp.zeros((batch, model.config.vocab_size), jnp.float32)

    def blocks(c, p, t):
        o = model.apply(p, t, attention_mask=valid, cache=c)
        return o.cache, o.hidden

    def step(c, p, t):
        o = model.apply(p, t, attention_mask=valid, cache=c)
        nxt, lp = _choose(model.logits(p, o.hidden)[:, 0], key, 3, sampling)
        return o.cache, nxt, lp

    def cache_update(c, kv):  # what the blocks do to the cache (layers.Attention)
        write = lambda x: jax.lax.dynamic_update_slice(x, kv, (0, 0, c.index, 0))  # noqa: E731
        return c._replace(k=tuple(map(write, c.k)), v=tuple(map(write, c.v)),
                          index=c.index + 1), kv

    b, h, _, d = cache.k[0].shape
    new_kv = jnp.ones((b, h, 1, d), cache.k[0].dtype)

    def fresh():  # each donating program consumes its own copy of the prompt's cache
        return jax.tree.map(jnp.copy, cache)

    return {
        "step": _median_ms(step, (fresh(), params, tok), donate=0),
        "blocks": _median_ms(blocks, (fresh(), params, tok), donate=0),
        "lm_head": _median_ms(lambda p, h: model.logits(p, h), (params, hidden)),
        "sampling": _median_ms(lambda z: _choose(z, key, 3, sampling), (logits,)),
        "cache_update": _median_ms(cache_update, (fresh(), new_kv), donate=0),
    }


def ours(model, params, prompts, mask, sampling: SamplingConfig, repeats: int) -> dict:
    sample = make_sampler(model, sampling)
    key = jax.random.PRNGKey(0)
    box = {}

    def run():
        box["out"] = jax.block_until_ready(sample(params, prompts, mask, key))

    first, steady = timed(run, repeats=repeats)
    tokens = int(np.asarray(box["out"].mask).sum())
    return {"tokens_per_s": round(tokens / steady, 1), "tokens": tokens,
            "s": round(steady, 3), "compile_s": round(first - steady, 2)}


def theirs(hf_model, prompts, sampling: SamplingConfig, repeats: int, fixed: bool) -> dict:
    torch, _ = torch_stack()
    ids = torch.as_tensor(prompts, dtype=torch.long)
    kw = dict(do_sample=True, temperature=sampling.temperature, top_k=0,
              top_p=sampling.top_p or 1.0,
              max_new_tokens=sampling.max_new_tokens, use_cache=True, pad_token_id=0)
    kw |= ({"min_new_tokens": sampling.max_new_tokens} if fixed else
           {"eos_token_id": list(sampling.eos_ids)})
    box = {}

    def run():
        with torch.no_grad():
            box["out"] = hf_model.generate(ids, attention_mask=torch.ones_like(ids), **kw)

    _, steady = timed(run, repeats=repeats)
    new = box["out"][:, ids.shape[1]:].numpy()
    eos = np.isin(new, np.asarray(sampling.eos_ids))
    before = np.cumsum(eos, axis=1) - eos  # EOS tokens strictly before each position
    tokens = new.size if fixed else int((before == 0).sum())  # up to each row's first EOS
    return {"tokens_per_s": round(tokens / steady, 1), "tokens": tokens, "s": round(steady, 3),
            "torch_threads": torch.get_num_threads()}


def workload(model, params, hf_model, batch: int, mode: str, a, bandwidth: float,
             weight_bytes: int) -> dict:
    vocab = model.config.vocab_size
    rng = np.random.default_rng(batch)
    prompts = rng.integers(1, vocab, (batch, a.prompt)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    eos = (vocab,) if mode != "eos" else tuple(range(vocab - vocab // 32, vocab))
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=eos, pad_id=0, temperature=0.7,
                              top_p=0.9 if mode == "top_p" else None)
    rec = {"ours": ours(model, params, prompts, mask, sampling, a.repeats)}
    bound = batch / (weight_bytes / bandwidth)  # tokens/s if a step only read the weights
    rec["bound_tokens_per_s"] = round(bound, 1)
    rec["fraction_of_bound"] = round(rec["ours"]["tokens_per_s"] / bound, 3)
    if hf_model is not None:
        rec["transformers"] = theirs(hf_model, prompts, sampling, a.repeats, mode != "eos")
        rec["ratio_ours_over_transformers"] = round(
            rec["ours"]["tokens_per_s"] / rec["transformers"]["tokens_per_s"], 2)
    return rec


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--prompt", type=int, default=34)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=REAL_135M["num_layers"],
                   help="fewer layers for a quick check (the figures are for 30)")
    a = p.parse_args(argv)
    model, params, hf_model = shared_checkpoint(REAL_135M | {"num_layers": a.layers})
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    bw = read_bandwidth()
    out = {"benchmark": "rollout", "model": "135M-class llama (random weights)",
           "layers": a.layers, "params_m": round(model.config.num_params() / 1e6, 1),
           "weight_mb": round(weight_bytes / 1e6, 1), "prompt": a.prompt, "new": a.new,
           "temperature": 0.7, "read_bandwidth": {k: v for k, v in bw.items()
                                                  if k != "best_bytes_per_s"}}
    sampling = SamplingConfig(max_new_tokens=a.new, eos_ids=(model.config.vocab_size,),
                              pad_id=0, temperature=0.7)
    for batch in a.batches:
        out[f"batch_{batch}"] = {
            mode: workload(model, params, hf_model, batch, mode, a, bw["best_bytes_per_s"],
                           weight_bytes) for mode in ("fixed", "eos", "top_p")}
        rec = out[f"batch_{batch}"]
        rec["ms_per_step"] = decode_split(model, params, batch, a.prompt + a.new, sampling)
        rec["filter_ms"] = filter_split(batch, model.config.vocab_size)
        rec["matmul_ceiling"] = ceiling = matmul_ceiling(params, batch)
        best = max(ceiling["xla_gb_s"], ceiling["numpy_gb_s"]) * 1e9
        rec["ceiling_fraction_of_bound"] = round(best / bw["best_bytes_per_s"], 3)
    return emit(out)


if __name__ == "__main__":
    main()
