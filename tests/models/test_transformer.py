"""The decoder: KV cache, padding, packing, sliding window, heads, dtypes, remat, presets, and
the Gemma / Qwen3 switches (per-layer windows, soft-caps, q/k norms, sandwich norms)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (PRESETS, ModelConfig, abstract_params, get_preset, init_model,
                             model_for, remat_compiler_options)

TOY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, heads=("lm", "value", "reward"))
GEMMA_LIKE = TOY.replace(
    family="gemma3", num_layers=3, head_dim=16, sliding_window=3,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    rope_theta=1e6, rope_local_theta=1e4, qk_norm=True, norm_unit_offset=True,
    sandwich_norms=True, scale_embeddings=True, mlp_activation="gelu_tanh",
    query_pre_attn_scalar=24, attn_logit_softcap=1.0, final_logit_softcap=2.0,
    tie_embeddings=True, heads=("lm",))


def _apply(model):
    """The model's pure apply, jitted (compiles once per shape; eager dispatch is slow)."""
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def toy():
    return init_model(TOY, jax.random.PRNGKey(0))


def _tokens(b, t, seed=1, vocab=97):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab)


def _cached_and_full(model, params):
    """11 tokens: a 5-token prefill then 6 one-token decode steps with the KV cache, and the
    plain forward pass. Returns ``(per-call hidden states, full hidden, final cache)``."""
    tok = _tokens(2, 11)
    full = _apply(model)(params, tok).hidden
    out = _apply(model)(params, tok[:, :5], cache=model.init_cache(2, 11))
    hidden, cache = [out.hidden], out.cache
    step = jax.jit(lambda p, x, c: model.apply(p, x, cache=c))
    for i in range(5, 11):
        o = step(params, tok[:, i:i + 1], cache)
        hidden.append(o.hidden)
        cache = o.cache
    return hidden, full, cache


def test_cached_decode_equals_full_forward(toy):
    model, params = toy
    hidden, full, cache = _cached_and_full(model, params)
    assert int(cache.index) == 11
    np.testing.assert_allclose(jnp.concatenate(hidden, 1), full, atol=2e-5)


def test_left_padding_gives_the_unpadded_result(toy):
    model, params = toy
    tok = _tokens(2, 7)
    padded = jnp.concatenate([jnp.full((2, 4), 5), tok], axis=1)
    mask = jnp.concatenate([jnp.zeros((2, 4), bool), jnp.ones((2, 7), bool)], axis=1)
    out = _apply(model)(params, padded, attention_mask=mask).hidden
    np.testing.assert_allclose(out[:, 4:], _apply(model)(params, tok).hidden, atol=2e-5)


def test_right_padding_does_not_change_real_tokens(toy):
    model, params = toy
    tok = _tokens(1, 6)
    padded = jnp.concatenate([tok, jnp.full((1, 3), 7)], axis=1)
    mask = jnp.arange(9)[None] < 6
    out = _apply(model)(params, padded, attention_mask=mask).hidden
    np.testing.assert_allclose(out[:, :6], _apply(model)(params, tok).hidden, atol=2e-5)


def test_packed_segments_equal_separate_sequences(toy):
    model, params = toy
    a, b = _tokens(1, 5, seed=2), _tokens(1, 4, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[0] * 5 + [1] * 4])
    pos = jnp.array([list(range(5)) + list(range(4))])
    out = _apply(model)(params, packed, segment_ids=seg, positions=pos).hidden
    np.testing.assert_allclose(out[:, :5], _apply(model)(params, a).hidden, atol=2e-5)
    np.testing.assert_allclose(out[:, 5:], _apply(model)(params, b).hidden, atol=2e-5)


def test_causal_future_tokens_do_not_leak(toy):
    model, params = toy
    tok = _tokens(1, 8)
    changed = tok.at[0, 6].set((tok[0, 6] + 1) % 97)
    h1, h2 = _apply(model)(params, tok).hidden, _apply(model)(params, changed).hidden
    np.testing.assert_allclose(h1[:, :6], h2[:, :6], atol=1e-6)
    assert float(jnp.abs(h1[:, 6:] - h2[:, 6:]).max()) > 1e-4


def test_sliding_window_limits_attention():
    cfg = TOY.replace(num_layers=1, sliding_window=3, family="mistral")
    model, params = init_model(cfg, jax.random.PRNGKey(0))
    tok = _tokens(1, 10)
    changed = tok.at[0, 2].set((tok[0, 2] + 1) % 97)
    h1, h2 = _apply(model)(params, tok).hidden, _apply(model)(params, changed).hidden
    # a query at t sees keys t-2..t: position 2 influences only positions 2, 3, 4
    diff = np.abs(np.asarray(h1 - h2)).max(-1)[0]
    assert np.all(diff[:2] < 1e-6) and np.all(diff[5:] < 1e-6) and np.all(diff[2:5] > 1e-5)
    # and the cached path applies the same window
    out = _apply(model)(params, tok[:, :4], cache=model.init_cache(1, 10))
    hs, cache = [out.hidden], out.cache
    for i in range(4, 10):
        o = _apply(model)(params, tok[:, i:i + 1], cache=cache)
        hs.append(o.hidden)
        cache = o.cache
    np.testing.assert_allclose(jnp.concatenate(hs, 1), h1, atol=2e-5)


def test_heads_shapes_and_reward_read_at_last_real_token(toy):
    model, params = toy
    tok = _tokens(2, 6)
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    h = _apply(model)(params, tok, attention_mask=mask).hidden
    logits, values = model.logits(params, h), model.values(params, h)
    r = model.rewards(params, h, mask)
    chex.assert_shape([logits, values, r], [(2, 6, 97), (2, 6), (2,)])
    assert logits.dtype == jnp.float32
    # changing the padding after the last real token leaves the reward unchanged
    tok2 = tok.at[0, 4:].set(3)
    h2 = _apply(model)(params, tok2, attention_mask=mask).hidden
    np.testing.assert_allclose(model.rewards(params, h2, mask), r, atol=1e-6)
    manual = h[0, 3] @ params["reward_head"]["kernel"][:, 0]
    np.testing.assert_allclose(r[0], manual, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_logits():
    cfg = TOY.replace(dtype="bfloat16", param_dtype="bfloat16", heads=("lm",))
    model, params = init_model(cfg, jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    h = _apply(model)(params, _tokens(2, 5)).hidden
    assert h.dtype == jnp.bfloat16
    logits = model.logits(params, h)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
    ref_model, _ = init_model(cfg.replace(dtype="float32", param_dtype="float32"),
                              jax.random.PRNGKey(0))
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    ref = ref_model.logits(f32, _apply(ref_model)(f32, _tokens(2, 5)).hidden)
    assert float(jnp.abs(logits - ref).max()) < 0.1  # bf16 rounding only


def test_remat_gives_the_same_gradient(toy):
    _, params = toy
    tok = _tokens(2, 6)
    grads = []
    for remat in (False, True):
        model, _ = init_model(TOY.replace(remat=remat), jax.random.PRNGKey(0))

        def loss(p):
            return jnp.mean(model.logits(p, model.apply(p, tok).hidden) ** 2)

        grads.append(jax.jit(jax.grad(loss))(params))
    chex.assert_trees_all_close(*grads, rtol=1e-5, atol=1e-7)


def test_remat_keeps_one_block_of_activations_whatever_the_depth():
    """Compiled with ``remat_compiler_options`` (as the trainer's steps are), a remat model's
    gradient holds one block's activations at a time: from 1 to 3 layers its temporaries grow
    by the 2 saved block inputs alone. Without the options XLA:CPU merges the recomputation
    into the forward pass and they grow by at least each layer's MLP activations."""
    tok = _tokens(4, 256)

    def growth(options):
        temps = []
        for layers in (1, 3):
            cfg = TOY.replace(num_layers=layers, remat=True, hidden_size=64,
                              intermediate_size=512)
            model = model_for(cfg)

            def loss(p):
                return jnp.mean(model.apply(p, tok).hidden ** 2)

            compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(
                abstract_params(cfg)).compile()
            temps.append(compiled.memory_analysis().temp_size_in_bytes)
        return temps[1] - temps[0]

    mlp_activations = 3 * 4 * 256 * 512 * 4  # gate, up and their product, float32
    block_input = 4 * 256 * 64 * 4
    assert remat_compiler_options("cpu") and remat_compiler_options("gpu") == {}
    assert growth({}) >= 2 * mlp_activations
    assert 0 <= growth(remat_compiler_options("cpu")) <= 2 * block_input * 1.1


def test_untied_lm_head_and_tied_embedding(toy):
    untied, params = toy
    assert "lm_head" in params
    np.testing.assert_array_equal(untied.unembedding(params), params["lm_head"]["kernel"])
    tied, p2 = init_model(TOY.replace(tie_embeddings=True), jax.random.PRNGKey(0))
    assert "lm_head" not in p2
    np.testing.assert_array_equal(tied.unembedding(p2), p2["embed"]["embedding"].T)
    reward_only, p3 = init_model(TOY.replace(heads=("reward",)), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no 'lm' head"):
        reward_only.unembedding(p3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    cfg = PRESETS[name]
    shapes = abstract_params(cfg)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.num_params()


def test_preset_sizes_are_as_named():
    assert 0.7e6 < PRESETS["toy-1m"].num_params() < 1.3e6
    assert 1.1e9 < PRESETS["llama-3.2-1b"].num_params() < 1.3e9
    assert 0.45e9 < PRESETS["qwen2.5-0.5b"].num_params() < 0.55e9
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt-5")


@pytest.mark.parametrize("bad", [dict(num_kv_heads=3), dict(family="gpt2"), dict(heads=()),
                                 dict(dtype="int8"), dict(sliding_window=0),
                                 dict(layer_types=("full_attention",)),
                                 dict(layer_types=("global", "global")),
                                 dict(layer_types=("sliding_attention", "full_attention")),
                                 dict(mlp_activation="relu"), dict(final_logit_softcap=0.0),
                                 dict(attn_logit_softcap=-1.0), dict(query_pre_attn_scalar=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        TOY.replace(**bad)


def test_cache_longer_than_context_is_refused(toy):
    model, _ = toy
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.init_cache(1, TOY.max_position_embeddings + 1)


@pytest.fixture(scope="module")
def gemma_like():
    model, params = init_model(GEMMA_LIKE, jax.random.PRNGKey(0))
    # move the zero-initialised (1 + w) norm weights off 0 so each norm's weight matters
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape)
        if "norm" in jax.tree_util.keystr(path) else 4.0 * x, params)
    return model, params


def test_gemma_like_cached_decode_equals_full_forward(gemma_like):
    """Per-layer windows (3, shorter than the 11 tokens), the local RoPE base and both caps
    give the same hidden states and logits with the KV cache as without."""
    model, params = gemma_like
    hidden, full, cache = _cached_and_full(model, params)
    np.testing.assert_allclose(jnp.concatenate(hidden, 1), full, atol=5e-5)
    logits = model.logits(params, full)
    assert float(jnp.abs(logits).max()) < 2.0  # the final cap bounds them


@pytest.mark.parametrize("change", [
    dict(layer_types=None),  # all layers slide
    dict(layer_types=("full_attention",) * 3),
    dict(rope_local_theta=None), dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
    dict(query_pre_attn_scalar=None), dict(mlp_activation="silu"), dict(scale_embeddings=False),
])
def test_each_gemma_switch_changes_the_logits(gemma_like, change):
    """No switch is silently ignored: turning any one off changes the outputs."""
    model, params = gemma_like
    other = init_model(GEMMA_LIKE.replace(**change), jax.random.PRNGKey(0))[0]
    tok = _tokens(1, 9)
    a = model.logits(params, _apply(model)(params, tok).hidden)
    b = other.logits(params, _apply(other)(params, tok).hidden)
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_gemma_like_window_is_per_layer(gemma_like):
    """Layer 0 slides (window 3), layer 1 is global: position 0 still reaches the last token
    through layer 1, while with every layer sliding it cannot (three layers reach 3 * 2 back)."""
    model, params = gemma_like
    tok = _tokens(1, 10)
    changed = tok.at[0, 0].set((tok[0, 0] + 1) % 97)

    def last(m):
        return np.asarray(_apply(m)(params, tok).hidden - _apply(m)(params, changed).hidden)

    assert np.abs(last(model)[0, -1]).max() > 1e-5
    all_sliding = init_model(GEMMA_LIKE.replace(layer_types=None), jax.random.PRNGKey(0))[0]
    assert np.abs(last(all_sliding)[0, -1]).max() < 1e-6


def test_scoring_applies_the_final_softcap(gemma_like):
    """The chunked log-probs of ``models.scoring`` equal ``log_softmax(Model.logits)``, which
    carries the cap (a path that forgot it would differ by far more than 1e-5)."""
    from rlhf_jax import ops
    from rlhf_jax.models import score_completions
    model, params = gemma_like
    prompt, completion = _tokens(2, 5), _tokens(2, 4, seed=2)
    scores = jax.jit(lambda p: score_completions(
        model, p, prompt, jnp.ones((2, 5), bool), completion, jnp.ones((2, 4), bool),
        temperature=0.7, entropy=True, chunk_v=10))(params)
    hidden = _apply(model)(params, jnp.concatenate([prompt, completion], 1)).hidden
    logits = model.logits(params, hidden[:, 4:8])
    np.testing.assert_allclose(scores.logprobs, ops.token_logprobs(logits, completion,
                                                                    temperature=0.7), atol=1e-5)
    np.testing.assert_allclose(scores.entropy, ops.entropy_from_logits(logits, temperature=0.7),
                               atol=1e-5)


def test_qk_norm_and_sandwich_params_and_counts():
    cfg = GEMMA_LIKE.replace(heads=("lm", "value"))
    params = abstract_params(cfg)
    block = params["layers"][0]
    assert block["attn"]["q_norm"]["weight"].shape == (16,)
    assert {"attn_out_norm", "mlp_out_norm", "post_attn_norm", "input_norm"} <= set(block)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == cfg.num_params()
