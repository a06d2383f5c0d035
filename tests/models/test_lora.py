"""LoRA / QLoRA at the model layer (``models.lora``, ``models.quantize``; PEFT files are in
``test_peft_io.py``).

Measured on CPU (float32), the numbers the bounds below are built from:

* LoRA forward vs the merged-weights forward (``W + s A B``), random ``B``, jitted: max |logit|
  gap 6.9e-7 (toy-1m, 1.2e-6 with rsLoRA; |logits| <= 1.6) and 2.1e-6 (llama fixture, |logits|
  <= 3.5), while the adapter moves the logits by 1 to 3.6.
* QLoRA base vs the float32 base, max |logit| error over 4 x 32 random tokens (mean in
  brackets; the logits' standard deviation is 0.65 for llama, 0.23 for toy-1m): llama fixture
  int8 0.070 (0.0084), NF4 0.888 (0.122); toy-1m int8 0.0205 (0.0028), NF4 0.235 (0.034).
  These are untrained random-init models, whose weights NF4 reproduces to 9.2% relative
  Frobenius error (the same values as ``qwix.dequantize(qwix.quantize(w, "nf4", ...))``).
* Gradient with respect to the adapter only: the optimised HLO has no ``dot`` whose result has
  a frozen matrix's shape, and XLA's FLOP count is 1.50x lower than the full gradient's (toy-1m,
  2 layers, 16 tokens).
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import get_preset, init_model, model_for
from rlhf_jax.models import quantize as qz
from rlhf_jax.models.hf import load_hf_checkpoint
from rlhf_jax.models.lora import (TARGETS, LoraConfig, LoraLinear, adapter_shapes, combine,
                                  init_adapter, lora_model, merge_adapter, quantize_base, split)
from rlhf_jax.models.layers import FlatLinear
from rlhf_jax.sampling import SamplingConfig, make_sampler, pad_prompts

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama"
TOY = get_preset("toy-1m", num_layers=2)


@functools.lru_cache(maxsize=None)
def _toy(config=TOY):
    return init_model(config, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _llama():
    config, params = load_hf_checkpoint(FIXTURE, dtype="float32")
    return model_for(config), params


def _random_adapter(model, seed: int = 5, scale: float = 0.05) -> dict:
    """``init_adapter`` with a random ``B`` (a fresh one is exactly the base)."""
    key = jax.random.PRNGKey(seed)
    ad = init_adapter(model, key)
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [x if not np.all(np.asarray(x) == 0) else scale * jax.random.normal(k, x.shape)
              for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda params, tokens: model.logits(params, model.apply(params, tokens).hidden))


def _logits(model, params, tokens) -> np.ndarray:
    return np.asarray(_forward(model)(params, tokens))


def _tokens(vocab: int, shape=(4, 32)):
    return jax.random.randint(jax.random.PRNGKey(3), shape, 0, vocab)


# ---------------------------------------------------------------- config and adapter tree
def test_config_validation():
    for bad in (dict(rank=0), dict(dropout=1.0), dict(targets="q_proj"), dict(targets=()),
                dict(quantize_base="int4")):
        with pytest.raises(ValueError):
            LoraConfig(**bad)
    assert LoraConfig(rank=4, alpha=8).scale == 2.0
    assert LoraConfig(rank=4, alpha=8, rslora=True).scale == 4.0
    with pytest.raises(ValueError, match=r"\['qkv'\] name no linear.*'down_proj'"):
        lora_model(TOY, LoraConfig(targets=("q_proj", "qkv")))


def test_adapter_mirrors_base_paths_and_starts_like_peft():
    base_model, base = _toy()
    model = lora_model(base_model, LoraConfig(rank=4, targets=("q_proj", "down_proj")))
    shapes = adapter_shapes(model)
    assert sorted(shapes) == ["layers"] and sorted(shapes["layers"]) == [0, 1]
    layer = jax.tree.map(lambda s: (s.shape, s.dtype.name), shapes["layers"][1])
    assert layer == {"attn": {"q_proj": {"lora_a": ((128, 4), "float32"),
                                         "lora_b": ((4, 128), "float32")}},
                     "mlp": {"down_proj": {"lora_a": ((344, 4), "float32"),
                                           "lora_b": ((4, 128), "float32")}}}
    ad = init_adapter(model, jax.random.PRNGKey(1))
    a = np.asarray(ad["layers"][0]["mlp"]["down_proj"]["lora_a"])
    assert 0.9 / np.sqrt(344) < np.abs(a).max() <= 1 / np.sqrt(344)  # U(-1/sqrt(in), ..)
    assert not np.any(np.asarray(ad["layers"][0]["attn"]["q_proj"]["lora_b"]))
    params = combine(base, ad)
    back_base, back_ad = split(params)
    assert jax.tree.structure(back_base) == jax.tree.structure(base)
    assert jax.tree.structure(back_ad) == jax.tree.structure(ad)
    assert all(x is y for x, y in zip(jax.tree.leaves(back_ad), jax.tree.leaves(ad)))
    with pytest.raises(ValueError, match="both hold"):
        combine(params, ad)


@pytest.mark.parametrize("remat,dtype", [(False, "float32"), (True, "float32"),
                                         (False, "bfloat16")])
def test_fresh_adapter_is_base_bitwise(remat, dtype):
    base_model, base = _toy(TOY.replace(remat=remat, dtype=dtype, param_dtype=dtype))
    model = lora_model(base_model, LoraConfig(rank=4))
    tokens = _tokens(TOY.vocab_size)
    params = combine(base, init_adapter(model, jax.random.PRNGKey(1)))
    eager = [np.asarray(m.logits(p, m.apply(p, tokens).hidden)).view(np.uint32)
             for m, p in ((base_model, base), (model, params))]
    np.testing.assert_array_equal(*eager)  # B = 0: each linear's output is the base's, bitwise
    # Compiled, XLA fuses the ``+ 0`` into the consumer (the rotary fusion after k_proj) and
    # emits its elementwise code differently: a few float32 ulps, measured 4.2e-7.
    jitted = _logits(model, params, tokens) - _logits(base_model, base, tokens)
    assert np.abs(jitted).max() <= (1e-6 if dtype == "float32" else 0.0)


@pytest.mark.parametrize("which,rslora,bound", [("toy", False, 2e-6), ("toy", True, 2e-6),
                                                ("llama", False, 5e-6)])
def test_lora_forward_equals_merged_forward(which, rslora, bound):
    base_model, base = _toy() if which == "toy" else _llama()
    model = lora_model(base_model, LoraConfig(rank=8, alpha=16.0, rslora=rslora))
    ad = _random_adapter(model)
    tokens = _tokens(base_model.config.vocab_size)
    lora = _logits(model, combine(base, ad), tokens)
    merged = _logits(base_model, merge_adapter(base, ad, model.lora), tokens)
    assert np.abs(lora - _logits(base_model, base, tokens)).max() > 0.3  # the adapter matters
    assert np.abs(lora - merged).max() <= bound


# ---------------------------------------------------------------- gradients
def test_linear_gradient_matches_numpy_reference():
    r, d_in, d_out, n, scale = 3, 5, 7, 6, 0.75
    base = FlatLinear(d_in, d_out, use_bias=True, rngs=nnx.Rngs(0))
    layer = LoraLinear(base, rank=r, scale=scale, dropout=0.0, quantize=None, index=0)
    graphdef, state = nnx.split(layer)
    params = nnx.to_pure_dict(state)
    g = np.random.default_rng(0)
    x, up = g.normal(size=(n, d_in)), g.normal(size=(n, d_out))  # up: dL/dy
    a, b = g.normal(size=(d_in, r)), g.normal(size=(r, d_out))

    def loss(ad):
        module = nnx.merge(graphdef, {**params, **ad})
        return jnp.sum(module(jnp.asarray(x, jnp.float32)) * up)

    grads = jax.grad(loss)({"lora_a": jnp.asarray(a, jnp.float32),
                            "lora_b": jnp.asarray(b, jnp.float32)})
    np.testing.assert_allclose(grads["lora_b"], scale * (x @ a).T @ up, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["lora_a"], scale * x.T @ (up @ b.T), rtol=1e-5, atol=1e-5)


def test_model_gradient_matches_finite_differences():
    base_model, base = _toy()
    model = lora_model(base_model, LoraConfig(rank=2, targets=("v_proj", "up_proj")))
    ad = _random_adapter(model)
    tokens = _tokens(TOY.vocab_size, (1, 6))

    def loss(adapter):
        p = combine(base, adapter)
        return jnp.sum(model.logits(p, model.apply(p, tokens).hidden) ** 2)

    grads = jax.jit(jax.grad(loss))(ad)
    loss = jax.jit(loss)
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(7), x.shape), ad)
    eps = 1e-3  # central differences: O(eps^2) truncation, float32 rounding ~1e-4 / eps
    plus = loss(jax.tree.map(lambda x, d: x + eps * d, ad, direction))
    minus = loss(jax.tree.map(lambda x, d: x - eps * d, ad, direction))
    fd = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads),
                                                 jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(fd), rtol=2e-3)


def _dot_shapes(hlo: str) -> set[tuple[int, ...]]:
    return {tuple(int(d) for d in dims.split(",") if d)
            for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} dot\(", hlo)}


def test_adapter_gradient_computes_no_frozen_weight_gradient():
    base_model, base = _toy()
    model = lora_model(base_model, LoraConfig(rank=4))
    ad = init_adapter(model, jax.random.PRNGKey(1))
    tokens = jnp.zeros((2, 8), jnp.int32)  # 16 rows: no activation has a weight's shape

    def loss_lora(adapter, base):
        p = combine(base, adapter)
        return jnp.sum(model.logits(p, model.apply(p, tokens).hidden))

    def loss_full(base):
        return jnp.sum(base_model.logits(base, base_model.apply(base, tokens).hidden))

    lora = jax.jit(jax.grad(loss_lora)).lower(ad, base).compile()
    full = jax.jit(jax.grad(loss_full)).lower(base).compile()
    frozen = {tuple(x.shape) for x in jax.tree.leaves(base) if x.ndim == 2}
    frozen |= {s[::-1] for s in frozen}
    assert frozen & _dot_shapes(full.as_text())  # the check can see weight gradients
    assert not frozen & _dot_shapes(lora.as_text())

    def flops(compiled):
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert flops(full) / flops(lora) >= 1.45  # measured 1.50


def test_qlora_adapter_gradient_computes_no_frozen_weight_gradient():
    base_model, base = _toy()
    model = lora_model(base_model, LoraConfig(rank=4, quantize_base="nf4"))
    qbase = quantize_base(base, model)
    tokens = jnp.zeros((2, 8), jnp.int32)

    def loss(adapter, qbase):
        p = combine(qbase, adapter)
        return jnp.sum(model.logits(p, model.apply(p, tokens).hidden))

    ad = init_adapter(model, jax.random.PRNGKey(1))
    hlo = jax.jit(jax.grad(loss)).lower(ad, qbase).compile().as_text()
    frozen = {tuple(x.shape) for x in jax.tree.leaves(base) if x.ndim == 2}
    assert not (frozen | {s[::-1] for s in frozen}) & _dot_shapes(hlo)


# ---------------------------------------------------------------- dropout
def test_dropout_needs_a_key_and_survives_remat():
    tokens = _tokens(TOY.vocab_size, (2, 8))
    grads = []
    for remat in (False, True):
        base_model, base = _toy(TOY.replace(remat=remat))
        model = lora_model(base_model, LoraConfig(rank=4, dropout=0.5))
        ad = _random_adapter(model)
        plain = _logits(model, combine(base, ad), tokens)
        k1 = _logits(model, combine(base, ad, dropout_key=jax.random.PRNGKey(1)), tokens)
        k1b = _logits(model, combine(base, ad, dropout_key=jax.random.PRNGKey(1)), tokens)
        k2 = _logits(model, combine(base, ad, dropout_key=jax.random.PRNGKey(2)), tokens)
        np.testing.assert_array_equal(k1, k1b)
        assert np.abs(k1 - plain).max() > 1e-3 and np.abs(k1 - k2).max() > 1e-3

        def loss(adapter):
            p = combine(base, adapter, dropout_key=jax.random.PRNGKey(1))
            return jnp.sum(model.logits(p, model.apply(p, tokens).hidden) ** 2)

        grads.append(jax.jit(jax.grad(loss))(ad))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):  # same masks
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # |grad| ~ 6, measured 2.5e-5
    no_dropout = lora_model(_toy()[0], LoraConfig(rank=4))
    base, ad = _toy()[1], _random_adapter(no_dropout)
    np.testing.assert_array_equal(
        _logits(no_dropout, combine(base, ad, dropout_key=jax.random.PRNGKey(1)), tokens),
        _logits(no_dropout, combine(base, ad), tokens))


# ---------------------------------------------------------------- sampling
def test_kv_cached_greedy_sampling_equals_merged_model():
    base_model, base = _llama()
    model = lora_model(base_model, LoraConfig(rank=8))
    ad = _random_adapter(model)
    cfg = SamplingConfig(max_new_tokens=12, eos_ids=(255,), pad_id=0, temperature=0.0)
    prompts, mask = pad_prompts([[5, 17, 42], [7, 8, 9, 10, 11, 200]], pad_id=0, buckets=(8,))
    key = jax.random.PRNGKey(0)
    lora = make_sampler(model, cfg)(combine(base, ad), prompts, mask, key)
    merged = make_sampler(base_model, cfg)(merge_adapter(base, ad, model.lora), prompts, mask,
                                           key)
    plain = make_sampler(base_model, cfg)(base, prompts, mask, key)
    np.testing.assert_array_equal(lora.tokens, merged.tokens)
    np.testing.assert_allclose(lora.logprobs, merged.logprobs, atol=1e-5)
    assert np.any(np.asarray(lora.tokens) != np.asarray(plain.tokens))


# ---------------------------------------------------------------- QLoRA
def _np_nf4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed codes, absmax, dequantised) by loops over blocks of 64 rows per column."""
    w = np.asarray(w, np.float32)
    i, o = w.shape
    nb = -(-i // 64)
    padded = np.zeros((nb * 64, o), np.float32)
    padded[:i] = w
    codes = np.zeros((nb * 64, o), np.uint8)
    absmax = np.zeros((nb, o), np.float32)
    for blk in range(nb):
        for j in range(o):
            x = padded[blk * 64:(blk + 1) * 64, j]
            absmax[blk, j] = np.abs(x).max()
            scaled = x / (absmax[blk, j] or 1.0)
            codes[blk * 64:(blk + 1) * 64, j] = np.argmin(np.abs(scaled[:, None] - qz.NF4), 1)
    packed = (codes[0::2] << 4) | codes[1::2]
    deq = qz.NF4[codes] * np.repeat(absmax, 64, axis=0)
    return packed, absmax, deq[:i]


def test_int8_and_nf4_match_numpy_reference():
    g = np.random.default_rng(0)
    w = (g.standard_normal((100, 24)) * 0.02).astype(np.float32)  # 100: a padded last block
    w[:, 3] = 0.0  # an all-zero column: scale 0, no NaN
    q8 = qz.quantize_int8(w)
    scale = np.abs(w).max(0) / 127
    codes = np.clip(np.round(w / np.where(scale == 0, 1, scale)), -127, 127)
    np.testing.assert_array_equal(q8["kernel_int8"], codes.astype(np.int8))
    np.testing.assert_array_equal(q8["kernel_scale"], scale.astype(np.float32))
    np.testing.assert_allclose(qz.dequantize(q8, 100, jnp.float32), codes * scale, rtol=1e-6)
    q4 = qz.quantize_nf4(w)
    packed, absmax, deq = _np_nf4(w)
    assert q4["kernel_nf4"].dtype == jnp.uint8 and q4["kernel_nf4"].shape == (64, 24)
    np.testing.assert_array_equal(q4["kernel_nf4"], packed)
    np.testing.assert_array_equal(q4["kernel_absmax"], absmax)
    np.testing.assert_allclose(qz.dequantize(q4, 100, jnp.float32), deq, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(qz.dequantize(q4, 100, jnp.float32))))


@pytest.mark.parametrize("which,mode,bound", [("llama", "int8", 0.08), ("llama", "nf4", 1.0),
                                              ("toy", "int8", 0.025), ("toy", "nf4", 0.27)])
def test_qlora_logit_error_against_float32_base(which, mode, bound):
    if which == "toy":  # the full toy-1m preset, as measured in the module doc
        base_model, base = _toy(get_preset("toy-1m"))
    else:
        base_model, base = _llama()
    model = lora_model(base_model, LoraConfig(rank=8, quantize_base=mode))
    qbase = quantize_base(base, model)
    tokens = _tokens(base_model.config.vocab_size)
    err = np.abs(_logits(model, combine(qbase, init_adapter(model, jax.random.PRNGKey(1))),
                         tokens) - _logits(base_model, base, tokens))
    assert 0 < err.max() <= bound


def test_qlora_quantizes_every_block_linear_and_adapts_only_targets():
    base_model, base = _toy()
    model = lora_model(base_model, LoraConfig(rank=2, targets=("q_proj",), quantize_base="nf4"))
    qbase = quantize_base(base, model)
    layer = qbase["layers"][0]
    for group, name in [("attn", n) for n in TARGETS[:4]] + [("mlp", n) for n in TARGETS[4:]]:
        assert sorted(layer[group][name]) == ["kernel_absmax", "kernel_nf4"]
    assert sorted(adapter_shapes(model)["layers"][0]) == ["attn"]
    assert sorted(adapter_shapes(model)["layers"][0]["attn"]) == ["q_proj"]
    assert qbase["embed"]["embedding"] is base["embed"]["embedding"]  # only block linears
    ad = _random_adapter(model)
    with pytest.raises(ValueError, match="quantised base cannot be merged"):
        merge_adapter(qbase, ad, model.lora)
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize_base(base, lora_model(base_model, LoraConfig(rank=2)))
