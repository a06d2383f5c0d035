"""Tests of token log-probs and entropies (rlhf_jax/ops/logprobs.py), plain and chunked.

Hand constants: softmax([0, ln 3]) = [1/4, 3/4]; log(1/4) = -1.386294, log(3/4) = -0.287682;
its entropy is 1/4 ln 4 + 3/4 ln(4/3) = 0.346574 + 0.215762 = 0.562335.
The chunked forms take ``hidden [B, T, D]`` and ``unembed [D, V]`` and must equal the plain forms
on ``hidden @ unembed`` in value and in both gradients, for chunk sizes that do not divide T or V.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops.logprobs import (
    chunked_entropy,
    chunked_logprobs_and_entropy,
    chunked_token_logprobs,
    entropy_from_logits,
    token_logprobs,
)
from tests.helpers import assert_all_finite, check_grads, float_array_strategy, np_log_softmax, rng

LN3 = math.log(3.0)
B, T, D, V = 2, 7, 5, 13  # small odd shapes: chunk sizes 3 / 4 divide neither T nor V


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _hwy(seed=0, b=B, t=T, d=D, v=V):
    r = rng(seed)
    h = r.normal(size=(b, t, d)).astype(np.float32)
    w = r.normal(size=(d, v)).astype(np.float32)
    y = r.integers(0, v, size=(b, t)).astype(np.int32)
    return h, w, y


# ------------------------------------------------------------------------- NumPy loop references
def np_token_logprobs(logits, targets, temperature=1.0):
    b, t, _ = logits.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            z = logits[i, j].astype(np.float64) / temperature
            mx = max(z)
            lse = mx + math.log(sum(math.exp(zv - mx) for zv in z))
            out[i, j] = z[targets[i, j]] - lse
    return out


def np_entropy(logits, temperature=1.0):
    b, t, _ = logits.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            z = logits[i, j].astype(np.float64) / temperature
            mx = max(z)
            e = [math.exp(zv - mx) for zv in z]
            s = sum(e)
            out[i, j] = -sum((ev / s) * math.log(ev / s) for ev in e if ev > 0)
    return out


# ------------------------------------------------------------------------------ token_logprobs
def test_token_logprobs_hand_two_tokens():
    # softmax([0, ln 3]) = [1/4, 3/4]: log-probs log(1/4) = -1.386294 and log(3/4) = -0.287682.
    logits = jnp.array([[[0.0, LN3], [0.0, LN3]]])
    lp = token_logprobs(logits, jnp.array([[0, 1]]))
    _close(lp, [[-1.386294, -0.287682]])
    # temperature 2 on [0, 2 ln 3] gives the same scaled logits [0, ln 3].
    lp2 = token_logprobs(2.0 * logits, jnp.array([[0, 1]]), temperature=2.0)
    _close(lp2, [[-1.386294, -0.287682]])


def test_token_logprobs_hand_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(jnp.zeros((1, 1, 3)), jnp.zeros((1, 1), jnp.int32), temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_numpy_loops(temperature):
    r = rng(1)
    logits = (3 * r.normal(size=(3, 5, 11))).astype(np.float32)
    y = r.integers(0, 11, size=(3, 5))
    _close(token_logprobs(logits, y, temperature=temperature),
           np_token_logprobs(logits, y, temperature))


def test_token_logprobs_numpy_bf16_input_is_float32_math():
    r = rng(2)
    logits = (4 * r.normal(size=(2, 3, 9))).astype(np.float32)
    lb = jnp.asarray(logits, jnp.bfloat16)
    y = r.integers(0, 9, size=(2, 3))
    out = token_logprobs(lb, y)
    assert out.dtype == jnp.float32
    _close(out, np_token_logprobs(np.asarray(lb.astype(jnp.float32)), y))


@given(float_array_strategy((2, 3, 6), -20.0, 20.0), st.floats(-30, 30, allow_subnormal=False))
def test_token_logprobs_property_normalised_and_shift_invariant(logits, c):
    all_y = [np.full((2, 3), v, np.int32) for v in range(6)]
    lps = np.stack([np.asarray(token_logprobs(logits, y)) for y in all_y], -1)  # [2, 3, 6]
    assert np.all(lps <= 1e-6)
    _close(np.exp(lps.astype(np.float64)).sum(-1), 1.0, atol=1e-5)  # a distribution
    shifted = token_logprobs(logits + np.float32(c), all_y[2])  # invariant to a constant shift
    _close(shifted, lps[..., 2], atol=2e-5)


def test_token_logprobs_grad_check_and_analytic():
    r = rng(3)
    logits = r.normal(size=(2, 3, 5)).astype(np.float32)
    y = r.integers(0, 5, size=(2, 3))
    check_grads(lambda z: token_logprobs(z, y, temperature=0.8), (logits,), order=1,
                modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # d/dz sum log softmax(z)_y = onehot(y) - softmax(z)
    g = jax.grad(lambda z: token_logprobs(z, y).sum())(logits)
    expected = np.eye(5)[y] - np.exp(np_log_softmax(logits))
    _close(g, expected)


def test_token_logprobs_grad_finite_for_extreme_logits():
    logits = jnp.array([[[1e4, -1e4, 0.0], [-80.0, 80.0, 0.0]]])
    g = jax.grad(lambda z: token_logprobs(z, jnp.array([[1, 0]])).sum())(logits)
    assert_all_finite(g, "gradient")


# ------------------------------------------------------------------------- entropy_from_logits
def test_entropy_from_logits_hand():
    # uniform over 4: ln 4 = 1.386294; softmax([0, ln 3]) = [1/4, 3/4]: 0.346574 + 0.215762.
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -jnp.inf, -jnp.inf]]])
    _close(entropy_from_logits(logits), [[1.386294, 0.562335]])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_entropy_from_logits_numpy_loops(temperature):
    logits = (3 * rng(4).normal(size=(3, 4, 10))).astype(np.float32)
    _close(entropy_from_logits(logits, temperature=temperature), np_entropy(logits, temperature))


@given(float_array_strategy((2, 3, 6), -20.0, 20.0), st.floats(-30, 30, allow_subnormal=False))
def test_entropy_from_logits_property_bounds_and_shift(logits, c):
    h = np.asarray(entropy_from_logits(logits))
    assert np.all(h >= -1e-5) and np.all(h <= math.log(6) + 1e-5)
    _close(entropy_from_logits(logits + np.float32(c)), h, atol=3e-5)
    # a sharper temperature cannot increase entropy: H(z / 0.5) <= H(z)
    assert np.all(np.asarray(entropy_from_logits(logits, temperature=0.5)) <= h + 1e-5)


def test_entropy_from_logits_grad():
    r = rng(5)
    logits = r.normal(size=(2, 3, 5)).astype(np.float32)
    check_grads(lambda z: entropy_from_logits(z, temperature=1.3), (logits,), order=1,
                modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)
    # dH/dz_v = -p_v (z_v - E_p[z])
    p = np.exp(np_log_softmax(logits))
    expected = -p * (logits - (p * logits).sum(-1, keepdims=True))
    _close(jax.grad(lambda z: entropy_from_logits(z).sum())(logits), expected)


# ------------------------------------------------------------------- chunked forms: hand, numpy
def test_chunked_token_logprobs_hand():
    # hidden [1, 0] picks row 0 of unembed = [0, ln 3]: log-probs -1.386294 (y=0), -0.287682.
    h = jnp.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    w = jnp.array([[0.0, LN3], [5.0, 5.0]])  # row 1: logits [5, 5] -> log(1/2) = -0.693147
    lp = chunked_token_logprobs(h, w, jnp.array([[0, 1, 1]]), chunk_t=2, chunk_v=1)
    _close(lp, [[-1.386294, -0.287682, -0.693147]])


def test_chunked_entropy_hand():
    h = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    w = jnp.array([[0.0, LN3], [5.0, 5.0]])  # entropies 0.562335 and ln 2 = 0.693147
    _close(chunked_entropy(h, w, chunk_t=1, chunk_v=1), [[0.562335, 0.693147]])


def test_chunked_token_logprobs_hand_rejects_bad_arguments():
    h, w, y = _hwy()
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_logprobs(h, w, y, temperature=-1.0)
    with pytest.raises(ValueError, match="chunk"):
        chunked_entropy(h, w, chunk_t=0)


CHUNKS = [(3, 4), (1, 1), (7, 13), (100, 100)]


@pytest.mark.parametrize("chunk_t,chunk_v", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_token_logprobs_numpy_loops(chunk_t, chunk_v, temperature):
    h, w, y = _hwy(6)
    logits = np.einsum("btd,dv->btv", h.astype(np.float64), w.astype(np.float64))
    out = chunked_token_logprobs(h, w, y, temperature=temperature, chunk_t=chunk_t,
                                 chunk_v=chunk_v)
    _close(out, np_token_logprobs(logits, y, temperature))
    _close(out, token_logprobs(jnp.asarray(h) @ w, y, temperature=temperature))


@pytest.mark.parametrize("chunk_t,chunk_v", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_chunked_entropy_numpy_loops(chunk_t, chunk_v, temperature):
    h, w, _ = _hwy(7)
    logits = np.einsum("btd,dv->btv", h.astype(np.float64), w.astype(np.float64))
    out = chunked_entropy(h, w, temperature=temperature, chunk_t=chunk_t, chunk_v=chunk_v)
    _close(out, np_entropy(logits, temperature))
    _close(out, entropy_from_logits(jnp.asarray(h) @ w, temperature=temperature))


# ---------------------------------------------------------------------- chunked forms: property
_chunks = st.sampled_from([(3, 4), (2, 5), (7, 13), (20, 6)])  # few: each pair compiles once
_jit_lp = jax.jit(chunked_token_logprobs, static_argnames=("temperature", "chunk_t", "chunk_v"))
_jit_ent = jax.jit(chunked_entropy, static_argnames=("temperature", "chunk_t", "chunk_v"))


@given(float_array_strategy((B, T, D), -3.0, 3.0), st.integers(0, 10_000), _chunks)
def test_chunked_token_logprobs_property_equals_plain(h, seed, chunks):
    _, w, y = _hwy(seed)
    out = _jit_lp(h, w, y, temperature=0.9, chunk_t=chunks[0], chunk_v=chunks[1])
    _close(out, token_logprobs(jnp.asarray(h) @ w, y, temperature=0.9), atol=2e-5)


@given(float_array_strategy((B, T, D), -3.0, 3.0), st.integers(0, 10_000), _chunks)
def test_chunked_entropy_property_equals_plain(h, seed, chunks):
    _, w, _ = _hwy(seed)
    out = _jit_ent(h, w, temperature=1.2, chunk_t=chunks[0], chunk_v=chunks[1])
    _close(out, entropy_from_logits(jnp.asarray(h) @ w, temperature=1.2), atol=2e-5)
    assert np.all(np.asarray(out) >= -1e-5) and np.all(np.asarray(out) <= math.log(V) + 1e-5)


def test_chunked_token_logprobs_property_large_logits_stay_finite():
    h, w, y = _hwy(8)
    out = chunked_token_logprobs(30 * h, 30 * w, y, chunk_t=3, chunk_v=4)  # logits ~ 1e3..1e4
    ref = token_logprobs(jnp.asarray(30 * h) @ (30 * w), y)
    assert_all_finite(out)
    _close(out, ref, rtol=1e-5, atol=1e-2)


def _large_logits(seed=915, b=2, t=5, d=4, v=37):
    """Logits near 1000 that ``hidden @ unembed`` reproduces exactly in float32: one-hot hidden
    rows pick a row of ``unembed = 1000 + N(0, 1)``."""
    r = rng(seed)
    h = np.eye(d, dtype=np.float32)[r.integers(0, d, size=(b, t))]  # [B, T, D] one-hot
    w = (1000.0 + r.normal(size=(d, v))).astype(np.float32)
    y = r.integers(0, v, size=(b, t)).astype(np.int32)
    return h, w, y, np.einsum("btd,dv->btv", h.astype(np.float64), w.astype(np.float64))


def test_token_logprobs_numpy_large_logits_full_precision():
    # Issue 15 item 9.3: at logits near 1000 the old forms rounded m + log s to the float32 spacing
    # of 1000 (6e-5) before subtracting; the float64 reference is the loop on the same logits.
    h, w, y, z = _large_logits()
    _close(token_logprobs(jnp.asarray(z, jnp.float32), y), np_token_logprobs(z, y),
           rtol=1e-6, atol=0.0)
    _close(entropy_from_logits(jnp.asarray(z, jnp.float32)), np_entropy(z), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("chunk_t,chunk_v", [(2, 5), (5, 37), (1, 1)])
def test_chunked_logprobs_and_entropy_numpy_large_logits_full_precision(chunk_t, chunk_v):
    # Same for the online statistics: E[z - m] is accumulated instead of E[z] (old: entropy off
    # by ~1e-4 here, 3e-5 relative; log-probs 3e-6 relative; now both ~6e-8).
    h, w, y, z = _large_logits()
    lp, ent = chunked_logprobs_and_entropy(h, w, y, chunk_t=chunk_t, chunk_v=chunk_v)
    _close(lp, np_token_logprobs(z, y), rtol=1e-6, atol=0.0)
    _close(ent, np_entropy(z), rtol=1e-6, atol=0.0)
    _close(chunked_entropy(h, w, chunk_t=chunk_t, chunk_v=chunk_v), np_entropy(z),
           rtol=1e-6, atol=0.0)


# -------------------------------------------------------------------------- chunked forms: grad
def _grads(f, h, w):
    g = jnp.asarray(rng(9).normal(size=h.shape[:2]), jnp.float32)  # a random cotangent
    return jax.value_and_grad(lambda a, b: jnp.sum(f(a, b) * g), argnums=(0, 1))(h, w)


@pytest.mark.parametrize("chunk_t,chunk_v", [(3, 4), (2, 5), (7, 13), (1, 1)])
def test_chunked_token_logprobs_grad_equals_plain(chunk_t, chunk_v):
    h, w, y = _hwy(10)
    v1, g1 = _grads(lambda a, b: chunked_token_logprobs(
        a, b, y, temperature=0.7, chunk_t=chunk_t, chunk_v=chunk_v), h, w)
    v2, g2 = _grads(lambda a, b: token_logprobs(a @ b, y, temperature=0.7), h, w)
    _close(v1, v2)
    _close(g1[0], g2[0])
    _close(g1[1], g2[1])


@pytest.mark.parametrize("chunk_t,chunk_v", [(3, 4), (2, 5), (7, 13), (1, 1)])
def test_chunked_entropy_grad_equals_plain(chunk_t, chunk_v):
    h, w, _ = _hwy(11)
    v1, g1 = _grads(lambda a, b: chunked_entropy(
        a, b, temperature=1.3, chunk_t=chunk_t, chunk_v=chunk_v), h, w)
    v2, g2 = _grads(lambda a, b: entropy_from_logits(a @ b, temperature=1.3), h, w)
    _close(v1, v2)
    _close(g1[0], g2[0])
    _close(g1[1], g2[1])


def test_chunked_token_logprobs_grad_check_grads():
    h, w, y = _hwy(12, b=1, t=4, d=3, v=5)
    check_grads(lambda a, b: chunked_token_logprobs(a, b, y, temperature=0.8, chunk_t=3,
                                                    chunk_v=2),
                (h, w), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_chunked_entropy_grad_check_grads():
    h, w, _ = _hwy(13, b=1, t=4, d=3, v=5)
    check_grads(lambda a, b: chunked_entropy(a, b, temperature=1.2, chunk_t=3, chunk_v=2),
                (h, w), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_chunked_token_logprobs_grad_under_jit_and_bf16():
    h, w, y = _hwy(14)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    f = jax.jit(jax.grad(lambda a, b: chunked_token_logprobs(a, b, y, chunk_t=3,
                                                             chunk_v=4).sum(), argnums=(0, 1)))
    gh, gw = f(hb, wb)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    ref = jax.grad(lambda a, b: token_logprobs(a @ b, y).sum(), argnums=(0, 1))(
        hb.astype(jnp.float32), wb.astype(jnp.float32))
    _close(gh.astype(jnp.float32), ref[0], rtol=2e-2, atol=2e-2)
    _close(gw.astype(jnp.float32), ref[1], rtol=2e-2, atol=2e-2)


# ------------------------------------------------------- fused log-probs + entropy: four kinds
def test_chunked_logprobs_and_entropy_hand():
    # the two hand cases above, from one sweep: row [1, 0] -> logits [0, ln 3], row [0, 1] ->
    # logits [5, 5]
    h = jnp.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    w = jnp.array([[0.0, LN3], [5.0, 5.0]])
    lp, ent = chunked_logprobs_and_entropy(h, w, jnp.array([[0, 1, 1]]), chunk_t=2, chunk_v=1)
    _close(lp, [[-1.386294, -0.287682, -0.693147]])
    _close(ent, [[0.562335, 0.562335, 0.693147]])


@pytest.mark.parametrize("chunk_t,chunk_v", CHUNKS)
def test_chunked_logprobs_and_entropy_numpy_loops(chunk_t, chunk_v):
    h, w, y = _hwy(15)
    logits = np.einsum("btd,dv->btv", h.astype(np.float64), w.astype(np.float64))
    lp, ent = chunked_logprobs_and_entropy(h, w, y, temperature=0.8, chunk_t=chunk_t,
                                           chunk_v=chunk_v)
    _close(lp, np_token_logprobs(logits, y, 0.8))
    _close(ent, np_entropy(logits, 0.8))


_jit_both = jax.jit(chunked_logprobs_and_entropy,
                    static_argnames=("temperature", "chunk_t", "chunk_v"))


@given(float_array_strategy((B, T, D), -3.0, 3.0), st.integers(0, 10_000), _chunks)
def test_chunked_logprobs_and_entropy_property_equals_the_separate_functions(h, seed, chunks):
    _, w, y = _hwy(seed)
    kw = dict(temperature=1.1, chunk_t=chunks[0], chunk_v=chunks[1])
    lp, ent = _jit_both(h, w, y, **kw)
    # The same statistics; separately compiled programs may differ in the last bits of z, and
    # both outputs are differences of numbers of size |z| (z_y - lse, lse - E[z]): a peaked row
    # with |z| ~ 8 differs by 2e-6 in an entropy of 0.12. So atol is 1e-6 per unit of max |z|.
    atol = 1e-6 * max(1.0, float(np.abs(np.asarray(h) @ w).max()) / kw["temperature"])
    _close(lp, _jit_lp(h, w, y, **kw), rtol=1e-6, atol=atol)
    _close(ent, _jit_ent(h, w, **kw), rtol=1e-6, atol=atol)


@pytest.mark.parametrize("chunk_t,chunk_v", [(3, 4), (7, 13), (1, 1)])
def test_chunked_logprobs_and_entropy_grad_equals_plain(chunk_t, chunk_v):
    """A loss on both outputs (as PPO's entropy bonus with its policy term): one backward sweep
    gives the gradient of the plain-logits form."""
    h, w, y = _hwy(16)
    g2 = jnp.asarray(rng(17).normal(size=h.shape[:2]), jnp.float32)

    def both(f):
        def loss(a, b):
            lp, ent = f(a, b)
            return jnp.sum(lp * g2) - 0.3 * jnp.sum(ent * g2 ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1))(h, w)

    v1, g1 = both(lambda a, b: chunked_logprobs_and_entropy(
        a, b, y, temperature=0.9, chunk_t=chunk_t, chunk_v=chunk_v))
    v0, g0 = both(lambda a, b: (token_logprobs(a @ b, y, temperature=0.9),
                                entropy_from_logits(a @ b, temperature=0.9)))
    _close(v1, v0)
    _close(g1[0], g0[0])
    _close(g1[1], g0[1])
    h1, w1, y1 = _hwy(18, b=1, t=4, d=3, v=5)
    check_grads(lambda a, b: sum(jnp.sum(o) for o in chunked_logprobs_and_entropy(
        a, b, y1, chunk_t=3, chunk_v=2)), (h1, w1), order=1, modes=["rev"], eps=1e-3,
        atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------- memory (XLA)
def _temp_bytes(f, *shapes):
    compiled = jax.jit(f).lower(*shapes).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("XLA memory_analysis() is not available on this backend")
    return analysis.temp_size_in_bytes


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "value_and_grad"])
@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_chunked_memory_does_not_grow_with_vocab_and_time(grad, which):
    """At fixed chunk sizes, 4x larger V and T leave the chunked temporaries flat (< 1.5x),
    while the plain form, which materialises [B, T, V] logits, grows about 16x."""
    b, d, ct, cv = 2, 16, 16, 128

    def build(t, v):
        if which == "logprobs":
            chunked, plain = (
                lambda h, w, y: chunked_token_logprobs(h, w, y, chunk_t=ct, chunk_v=cv),
                lambda h, w, y: token_logprobs(h @ w, y))
        else:
            chunked, plain = (lambda h, w, y: chunked_entropy(h, w, chunk_t=ct, chunk_v=cv),
                              lambda h, w, y: entropy_from_logits(h @ w))
        if grad:
            chunked, plain = (jax.value_and_grad(lambda h, w, y, f=f: f(h, w, y).sum(),
                                                 argnums=(0, 1)) for f in (chunked, plain))
        args = (_sds(b, t, d), _sds(d, v), _sds(b, t, dtype=jnp.int32))
        return _temp_bytes(chunked, *args), _temp_bytes(plain, *args)

    small_c, small_p = build(64, 1024)
    big_c, big_p = build(256, 4096)
    assert big_c < 1.5 * small_c, (small_c, big_c)
    assert big_p > 8 * small_p, (small_p, big_p)
    # and the chunked form is far below one copy of the big logits
    assert big_c < 0.1 * (b * 256 * 4096 * 4), big_c


def test_entropy_from_logits_grad_finite_with_minus_inf_logits():
    logits = jnp.array([[[0.0, LN3, -jnp.inf, -jnp.inf], [1.0, -jnp.inf, 2.0, 0.5]]])
    h, g = jax.value_and_grad(lambda z: entropy_from_logits(z).sum())(logits)
    assert_all_finite(g, "gradient")
    _close(h, 0.562335 + np_entropy(np.array([[[1.0, 2.0, 0.5]]]))[0, 0])
    # the gradient on the live entries equals the gradient with the dead entries removed
    g_live = jax.grad(lambda z: entropy_from_logits(z).sum())(jnp.array([[[1.0, 2.0, 0.5]]]))
    _close(g[0, 1, [0, 2, 3]], g_live[0, 0])
    _close(g[0, 0, 2:], 0.0)


# ------------------------------------------------------- soft-capped logits (Gemma 2's final cap)
@pytest.mark.parametrize("chunk_t,chunk_v", [(3, 4), (7, 13), (1, 1)])
def test_chunked_softcap_equals_plain_on_capped_logits(chunk_t, chunk_v):
    """Values and gradients of all three chunked forms with ``softcap=c`` equal the plain forms
    on ``c tanh(h w / c)`` (a cap of 1.5 bends the N(0, 5) logits hard)."""
    h, w, y = _hwy(16)
    cap, kw = 1.5, dict(temperature=0.8, chunk_t=chunk_t, chunk_v=chunk_v, softcap=1.5)

    def capped(a, b):
        return cap * jnp.tanh((a @ b) / cap)

    pairs = [
        (lambda a, b: chunked_token_logprobs(a, b, y, **kw),
         lambda a, b: token_logprobs(capped(a, b), y, temperature=0.8)),
        (lambda a, b: chunked_entropy(a, b, **kw),
         lambda a, b: entropy_from_logits(capped(a, b), temperature=0.8)),
        (lambda a, b: sum(chunked_logprobs_and_entropy(a, b, y, **kw)),
         lambda a, b: token_logprobs(capped(a, b), y, temperature=0.8)
         + entropy_from_logits(capped(a, b), temperature=0.8)),
    ]
    for chunked, plain in pairs:
        (v1, g1), (v2, g2) = _grads(chunked, h, w), _grads(plain, h, w)
        _close(v1, v2)
        _close(g1[0], g2[0])
        _close(g1[1], g2[1])
    np_ref = np_token_logprobs(np.asarray(capped(h, w)), y, temperature=0.8)
    _close(chunked_token_logprobs(h, w, y, **kw), np_ref)
    with pytest.raises(ValueError, match="softcap"):
        chunked_token_logprobs(h, w, y, softcap=0.0)
