"""The jitted KV-cached sampler: log-prob agreement with the trainer, greedy correctness,
per-row RNG, EOS handling, n samples per prompt, filtering and shape bucketing."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops
from rlhf_jax.models import ModelConfig, init_model
from rlhf_jax.sampling import (
    SamplingConfig,
    bucket_length,
    filter_logits,
    inverse_cdf_sample,
    make_sampler,
    pad_prompts,
)

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2)
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11]]


@pytest.fixture(scope="module")
def toy():
    return init_model(CFG, jax.random.PRNGKey(0))


def _recomputed_logprobs(model, params, out, temperature):
    full = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    mask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    hidden = jax.jit(model.apply)(params, full, attention_mask=mask).hidden
    p = out.prompt_tokens.shape[1]
    logits = model.logits(params, hidden[:, p - 1:-1])
    return ops.token_logprobs(logits, out.tokens, temperature=temperature)


def _greedy_without_cache(model, params, tokens, mask, n):
    """Naive greedy decoding: each of ``n`` tokens is the argmax of a full forward pass (no KV
    cache) over the prompt and the tokens chosen so far. The sequence lives in a fixed
    ``[B, P + n]`` buffer whose not-yet-written tail is masked out and lies after the position
    read (causal attention never reaches it), so the forward compiles once, not once per length."""
    b, p = tokens.shape
    seq = jnp.concatenate([jnp.asarray(tokens), jnp.zeros((b, n), jnp.int32)], axis=1)
    seq_mask = jnp.concatenate([jnp.asarray(mask, bool), jnp.zeros((b, n), bool)], axis=1)

    @jax.jit
    def step(seq, seq_mask, i):  # i: the position to fill
        hidden = model.apply(params, seq, attention_mask=seq_mask).hidden
        logits = model.logits(params, jax.lax.dynamic_slice_in_dim(hidden, i - 1, 1, axis=1))
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(seq.dtype)
        return seq.at[:, i].set(nxt), seq_mask.at[:, i].set(True)

    for i in range(p, p + n):
        seq, seq_mask = step(seq, seq_mask, i)
    return np.asarray(seq[:, p:])


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=10),
                                dict(temperature=1.3, top_p=0.8, n=2)])
def test_sampler_logprobs_equal_trainer_recomputation(toy, kw):
    model, params = toy
    cfg = SamplingConfig(max_new_tokens=12, eos_ids=(0,), pad_id=0, **kw)
    tokens, mask = pad_prompts(PROMPTS, pad_id=0)
    out = make_sampler(model, cfg)(params, tokens, mask, jax.random.PRNGKey(3))
    lp = _recomputed_logprobs(model, params, out, cfg.temperature)
    diff = jnp.where(out.mask, lp - out.logprobs, 0.0)
    assert float(jnp.abs(diff).max()) < 1e-5
    assert np.all(np.asarray(out.logprobs)[~np.asarray(out.mask)] == 0)


def test_greedy_equals_argmax_of_full_forward(toy):
    model, params = toy
    cfg = SamplingConfig(max_new_tokens=8, eos_ids=(60,), pad_id=0, temperature=0.0)
    tokens, mask = pad_prompts(PROMPTS[:2], pad_id=0)
    out = make_sampler(model, cfg)(params, tokens, mask, jax.random.PRNGKey(0))
    expected = _greedy_without_cache(model, params, tokens, mask, 8)
    got = np.asarray(out.tokens)
    for r in range(2):  # equal up to and including the first EOS (none expected here)
        n = int(out.mask[r].sum())
        np.testing.assert_array_equal(got[r, :n], expected[r, :n])


GEMMA_LIKE = CFG.replace(
    family="gemma2", num_layers=3, head_dim=16, sliding_window=3,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    rope_theta=1e6, rope_local_theta=1e4, qk_norm=True, norm_unit_offset=True,
    sandwich_norms=True, scale_embeddings=True, mlp_activation="gelu_tanh",
    query_pre_attn_scalar=24, attn_logit_softcap=1.0, final_logit_softcap=2.0,
    tie_embeddings=True)


def test_gemma_like_greedy_with_cache_equals_argmax_of_full_forward():
    """Per-layer sliding windows (3, shorter than prompt plus completion), the local RoPE base
    and both soft-caps behave the same with the sampler's KV cache as in a full forward, and the
    sampler's log-probs are those of the capped logits."""
    model, params = init_model(GEMMA_LIKE, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: 4.0 * x if x.ndim > 1 else x + 0.3, params)  # sharper
    cfg = SamplingConfig(max_new_tokens=10, eos_ids=(60,), pad_id=0, temperature=0.0)
    tokens, mask = pad_prompts(PROMPTS[:2], pad_id=0)
    out = make_sampler(model, cfg)(params, tokens, mask, jax.random.PRNGKey(0))
    expected = _greedy_without_cache(model, params, tokens, mask, 10)
    got = np.asarray(out.tokens)
    for r in range(2):  # equal up to and including the first EOS
        n = int(out.mask[r].sum())
        assert n >= 3
        np.testing.assert_array_equal(got[r, :n], expected[r, :n])
    lp = _recomputed_logprobs(model, params, out, 1.0)
    assert float(jnp.abs(jnp.where(out.mask, lp - out.logprobs, 0.0)).max()) < 1e-5


def test_top_k_one_is_greedy(toy):
    model, params = toy
    tokens, mask = pad_prompts(PROMPTS, pad_id=0)
    greedy = make_sampler(model, SamplingConfig(max_new_tokens=6, eos_ids=(60,), pad_id=0,
                                                temperature=0.0))(params, tokens, mask,
                                                                  jax.random.PRNGKey(0))
    top1 = make_sampler(model, SamplingConfig(max_new_tokens=6, eos_ids=(60,), pad_id=0,
                                              temperature=1.0, top_k=1))(params, tokens, mask,
                                                                         jax.random.PRNGKey(9))
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(top1.tokens))


def test_row_sample_does_not_depend_on_other_rows(toy):
    model, params = toy
    cfg = SamplingConfig(max_new_tokens=10, eos_ids=(0,), pad_id=0)
    sampler = make_sampler(model, cfg)
    t3, m3 = pad_prompts(PROMPTS, pad_id=0)
    t1, m1 = pad_prompts(PROMPTS[:1], pad_id=0)
    a = sampler(params, t3, m3, jax.random.PRNGKey(5))
    b = sampler(params, t1, m1, jax.random.PRNGKey(5))
    np.testing.assert_array_equal(np.asarray(a.tokens[0]), np.asarray(b.tokens[0]))
    c = sampler(params, t1, m1, jax.random.PRNGKey(6))
    assert not np.array_equal(np.asarray(b.tokens), np.asarray(c.tokens))


def test_eos_ends_rows_mask_includes_eos_and_pad_equals_eos(toy):
    model, params = toy
    # every id but 0 is an EOS, so each row ends at its first non-zero token
    cfg = SamplingConfig(max_new_tokens=6, eos_ids=tuple(range(1, 61)), pad_id=1)
    tokens, mask = pad_prompts(PROMPTS, pad_id=1)
    out = make_sampler(model, cfg)(params, tokens, mask, jax.random.PRNGKey(0))
    toks, m = np.asarray(out.tokens), np.asarray(out.mask)
    for r in range(3):
        first = int(np.argmax(toks[r] != 0)) if np.any(toks[r] != 0) else None
        if first is None:
            assert m[r].all() and out.truncated[r]
        else:
            assert m[r, :first + 1].all() and not m[r, first + 1:].any()
            assert np.all(toks[r, first + 1:] == 1)  # pad == an EOS id, excluded by the mask
            assert not out.truncated[r]


def test_n_samples_per_prompt_layout(toy):
    model, params = toy
    cfg = SamplingConfig(max_new_tokens=5, eos_ids=(0,), pad_id=0, n=3)
    tokens, mask = pad_prompts(PROMPTS[:2], pad_id=0)
    out = make_sampler(model, cfg)(params, tokens, mask, jax.random.PRNGKey(1))
    chex.assert_shape([out.tokens, out.mask, out.logprobs], (6, 5))
    np.testing.assert_array_equal(np.asarray(out.prompt_tokens), np.repeat(tokens, 3, axis=0))
    assert len({tuple(r) for r in np.asarray(out.tokens[:3])}) > 1  # samples differ


def test_a_group_shares_one_prefill_and_samples_as_repeated_prompts(toy):
    """``n = 4`` prefills each prompt once and broadcasts its cache to the group's rows: the
    rows sample exactly what the prompts repeated 4 times (one row each) sample, and the
    compiled program does fewer flops (the repeated prompts' prefill is 4x the work)."""
    model, params = toy
    tokens, mask = pad_prompts(PROMPTS, pad_id=0)
    base = dict(max_new_tokens=6, eos_ids=(0,), pad_id=0, temperature=1.0)
    group, single = SamplingConfig(n=4, **base), SamplingConfig(**base)
    rep = np.repeat(tokens, 4, axis=0), np.repeat(mask, 4, axis=0)
    key = jax.random.PRNGKey(5)
    a = make_sampler(model, group)(params, tokens, mask, key)
    b = make_sampler(model, single)(params, *rep, key)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.prompt_tokens), rep[0])
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-6)

    def flops(cfg, *args):
        lowered = make_sampler(model, cfg).lower(params, *args, key)
        return lowered.compile().cost_analysis()["flops"]

    assert flops(group, tokens, mask) < flops(single, *rep)


def test_filter_logits_hand():
    z = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    # top-p 0.7: 0.5 (mass before 0) and 0.3 (mass before 0.5 < 0.7) stay; 0.15 has 0.8 before
    kept = np.asarray(filter_logits(z, top_k=None, top_p=0.7)) > -1e29
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.asarray(filter_logits(z, top_k=3, top_p=None)) > -1e29
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
    kept = np.asarray(filter_logits(z, top_k=3, top_p=0.4)) > -1e29
    np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_prompt_bucketing_compiles_once_per_bucket(toy):
    model, params = toy
    cfg = SamplingConfig(max_new_tokens=4, eos_ids=(0,), pad_id=0, temperature=0.5)
    sampler = make_sampler(model, cfg)
    before = sampler._cache_size()
    for prompts in ([[1, 2]], [[1, 2, 3, 4, 5]], [[7] * 16]):
        tokens, mask = pad_prompts(prompts, pad_id=0, buckets=(16, 32))
        assert tokens.shape == (1, 16)
        sampler(params, tokens, mask, jax.random.PRNGKey(0))
    assert sampler._cache_size() - before == 1
    assert bucket_length(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_length(33, (16, 32))


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(eos_ids=())])
def test_sampling_config_validation(bad):
    kw = dict(max_new_tokens=4, eos_ids=(0,), pad_id=0) | bad
    with pytest.raises(ValueError):
        SamplingConfig(**kw)


def test_pad_prompts_left_pads():
    tokens, mask = pad_prompts([[4, 5], [6]], pad_id=9, buckets=(4,))
    np.testing.assert_array_equal(tokens, [[9, 9, 4, 5], [9, 9, 9, 6]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1], []], pad_id=0)


def test_inverse_cdf_sample_hand():
    probs = jnp.array([[0.5, 0.0, 0.3, 0.2]] * 5)
    u = jnp.array([0.0, 0.49, 0.5, 0.79, 0.999])
    # cdf = [0.5, 0.5, 0.8, 1.0]: u < 0.5 -> 0; 0.5 <= u < 0.8 -> 2 (never the p=0 token 1)
    np.testing.assert_array_equal(np.asarray(inverse_cdf_sample(probs, u)), [0, 0, 2, 2, 3])
    # unnormalised mass is handled (u is scaled by the row total)
    np.testing.assert_array_equal(np.asarray(inverse_cdf_sample(probs * 3, u)), [0, 0, 2, 2, 3])


def test_sampled_token_frequencies_match_the_distribution():
    """200k draws through the sampler's path: frequencies within 4 sigma of softmax(z / T)."""
    from rlhf_jax.sampling.sampler import _choose

    z = jnp.log(jnp.array([0.4, 0.05, 0.25, 0.2, 0.1]))
    n = 200_000
    cfg = SamplingConfig(max_new_tokens=1, eos_ids=(0,), pad_id=0, temperature=0.5)
    # z is an argument, not a closure constant: XLA would constant-fold the [n, 5] cumsum
    tok, lp = jax.jit(lambda z, k: _choose(jnp.broadcast_to(z, (n, 5)), k, 3, cfg))(
        z, jax.random.PRNGKey(0))
    p = np.asarray(jax.nn.softmax(z / 0.5))
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 4 * sigma), (freq, p)
    np.testing.assert_allclose(np.asarray(lp), np.log(p)[np.asarray(tok)], rtol=1e-5)


def _np_filter(z: np.ndarray, top_k, top_p) -> np.ndarray:
    """NumPy reference of ``filter_logits``'s kept set, by sorting (float64 probabilities)."""
    keep = np.ones_like(z, bool)
    if top_k is not None:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        keep &= z >= kth
    if top_p is not None:
        zk = np.where(keep, z.astype(np.float64), -np.inf)
        p = np.exp(zk - zk.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        above = (p[:, None, :] > p[:, :, None]) * p[:, None, :]  # [B, i, j]: p_j if p_j > p_i
        keep &= above.sum(-1) < top_p
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_filter_logits_matches_sorting_reference(seed):
    """Property: the bisection thresholds keep exactly the sorted reference's set, ties included
    (logits drawn from a small grid so that equal values are common)."""
    r = np.random.default_rng(seed)
    v = int(r.integers(2, 200))
    z = (r.integers(-40, 40, (5, v)) / 8.0).astype(np.float32)
    z[0, : v // 2] = -0.0  # negative zeros count as zeros
    top_k = int(r.integers(1, v + 1))
    top_p = float(r.choice([0.05, 0.3, 0.61, 0.9, 0.999]))
    for k, p in [(top_k, None), (None, top_p), (top_k, top_p)]:
        kept = np.asarray(filter_logits(jnp.asarray(z), top_k=k, top_p=p)) > -1e29
        want = _np_filter(z, k, p)
        np.testing.assert_array_equal(kept, want, err_msg=f"top_k={k} top_p={p}")
        assert kept.any(-1).all()  # the most likely token always survives


def test_filter_logits_on_a_sharded_batch():
    """Rows split over the 8-device mesh filter exactly as on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    z = jax.random.normal(jax.random.PRNGKey(0), (16, 300)) * 3
    fn = jax.jit(lambda z: filter_logits(z, top_k=40, top_p=0.8))
    sharded = fn(jax.device_put(z, NamedSharding(mesh, P("data"))))
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(fn(z)))
