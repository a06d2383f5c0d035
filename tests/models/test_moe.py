"""Tests of rlhf_jax/models/moe.py: each pure function by hand, against NumPy loops, by
properties, by gradients and on the 8-device mesh; ``MoEMLP`` against the transformers
Qwen3-MoE and Mixtral sparse blocks; the HF weight layouts; no dense [N, E, *] intermediate."""

from __future__ import annotations

import doctest
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.models import moe
from rlhf_jax.models.moe import expert_mlp, load_balancing_loss, route
from rlhf_jax.parallel import rules
from tests.helpers import check_grads, float_array_strategy, random_mask, rng
from tests.parallel.common import mesh_for

N, E, K, D, F = 13, 7, 2, 10, 12  # distinct sizes, so the HLO shape check is unambiguous


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _weights(r, e=E, d=D, f=F, scale=0.3):
    g = lambda *s: (scale * r.normal(size=s)).astype(np.float32)  # noqa: E731
    return g(e, d, f), g(e, d, f), g(e, f, d)


def _assignment(r, n=N, e=E, k=K):
    experts = np.stack([r.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    w = r.random((n, k)).astype(np.float32)
    return w / w.sum(-1, keepdims=True), experts


# ------------------------------------------------------------------------- NumPy references
def _np_softmax(z):
    z = np.asarray(z, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _np_route(logits, k, norm):
    probs = _np_softmax(logits)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, experts, -1)
    return (w / w.sum(-1, keepdims=True) if norm else w), experts


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _np_expert_mlp(x, w, experts, wg, wu, wd, g_out=None):
    """Loop reference; with ``g_out`` also the hand-derived gradients (dx, dw, dwg, dwu, dwd)."""
    x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, wg, wu, wd))
    out = np.zeros_like(x)
    grads = [np.zeros_like(a) for a in (x, w, wg, wu, wd)]
    for n in range(x.shape[0]):
        for j, e in enumerate(experts[n]):
            a, b = x[n] @ wg[e], x[n] @ wu[e]
            h = _silu(a) * b
            y = h @ wd[e]
            out[n] += w[n, j] * y
            if g_out is None:
                continue
            dy = w[n, j] * g_out[n]
            sig = 1.0 / (1.0 + np.exp(-a))
            dh = wd[e] @ dy
            da, db = dh * b * sig * (1 + a * (1 - sig)), dh * _silu(a)
            grads[0][n] += wg[e] @ da + wu[e] @ db
            grads[1][n, j] += y @ g_out[n]
            grads[2][e] += np.outer(x[n], da)
            grads[3][e] += np.outer(x[n], db)
            grads[4][e] += np.outer(h, dy)
    return out if g_out is None else (out, grads)


def _np_lb_loss(logits, experts, mask, e):
    logits = np.asarray(logits).reshape(-1, logits.shape[-1])
    experts = np.asarray(experts).reshape(-1, experts.shape[-1])
    reps = logits.shape[0] // len(mask) if mask is not None else 1
    m = np.ones(len(logits)) if mask is None else np.tile(np.asarray(mask, np.float64), reps)
    rows = max(m.sum(), 1.0)
    f, p = np.zeros(e), np.zeros(e)
    for r in range(len(logits)):
        for x in experts[r]:
            f[x] += m[r] / rows
        p += m[r] * _np_softmax(logits[r]) / rows
    return e * float(f @ p)


def test_docstring_example():
    assert doctest.testmod(moe, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


# -------------------------------------------------------------------------------- route
def test_route_hand():
    # probs (1/8, 2/8, 5/8): top-2 = experts (2, 1) with (5/8, 2/8), renormalised (5/7, 2/7).
    logits = jnp.log(jnp.array([[1.0, 2.0, 5.0], [4.0, 3.0, 1.0]]))
    w, e = route(logits, top_k=2, norm_topk_prob=False)
    assert e.dtype == jnp.int32 and e.tolist() == [[2, 1], [0, 1]]
    _close(w, [[5 / 8, 2 / 8], [4 / 8, 3 / 8]])
    w, _ = route(logits, top_k=2, norm_topk_prob=True)
    _close(w, [[5 / 7, 2 / 7], [4 / 7, 3 / 7]])
    w, e = route(logits, top_k=1, norm_topk_prob=True)  # a single expert gets weight 1
    _close(w, [[1.0], [1.0]])


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_route_numpy(norm, dtype):
    logits = rng(1).normal(size=(N, E)).astype(np.float32) * 3
    w, e = route(jnp.asarray(logits, dtype), top_k=3, norm_topk_prob=norm)
    rw, re_ = _np_route(np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32)), 3, norm)
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(e, re_)
    _close(w, rw)


@given(float_array_strategy((4, 6), -8.0, 8.0), st.integers(1, 6), st.floats(-20, 20))
def test_route_property(logits, k, shift):
    w, e = route(logits, top_k=k, norm_topk_prob=False)
    wn, en = route(logits, top_k=k, norm_topk_prob=True)
    np.testing.assert_array_equal(e, en)
    assert all(len(set(row)) == k for row in np.asarray(e).tolist())  # k distinct experts
    assert np.all(np.diff(np.asarray(w), axis=-1) <= 0)  # descending
    probs = jax.nn.softmax(logits, axis=-1)
    _close(w, jnp.take_along_axis(probs, e, -1))
    _close(jnp.sum(wn, -1), np.ones(4))
    # Mixtral: softmax, top-k, renormalise == softmax over the top-k logits.
    _close(wn, jax.nn.softmax(jnp.take_along_axis(logits, e, -1), axis=-1))
    ws, es = route(logits + np.float32(shift), top_k=k, norm_topk_prob=True)  # shift invariance
    if np.array_equal(es, e):  # (ties may reorder after rounding)
        _close(ws, wn, atol=1e-5)


@pytest.mark.parametrize("norm", [False, True])
def test_route_grad(norm):
    r = rng(2)  # well-separated logits, so finite differences do not cross a top-k boundary
    logits = (r.permutation(E * 4).reshape(4, E) * 0.3).astype(np.float32)
    check_grads(lambda z: route(z, top_k=K, norm_topk_prob=norm)[0], (logits,), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def _mesh():
    return mesh_for((2, 2, 2))


def _batch(mesh):
    return NamedSharding(mesh, P(("data", "fsdp")))


def test_route_mesh_8dev():
    mesh = _mesh()
    logits = rng(3).normal(size=(16, E)).astype(np.float32)
    fn = jax.jit(lambda z: route(z, top_k=K, norm_topk_prob=True))
    single = fn(logits)
    sharded = fn(jax.device_put(logits, _batch(mesh)))
    for a, b in zip(single, sharded):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- expert_mlp
def test_expert_mlp_hand():
    # D = F = 1. FFN_0(x) = silu(1x) * 3x * 1, FFN_1(x) = silu(2x) * 1x * (-1); expert 2 idle.
    silu = lambda z: z / (1 + math.exp(-z))  # noqa: E731
    ffn0, ffn1 = lambda x: silu(x) * 3 * x, lambda x: -silu(2 * x) * x  # noqa: E731
    x = jnp.array([[1.0], [2.0], [-1.0]])
    experts = jnp.array([[0, 1], [1, 0], [1, 0]], jnp.int32)
    w = jnp.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    wg, wu, wd = (jnp.array(v, jnp.float32).reshape(3, 1, 1)
                  for v in ([1.0, 2.0, 9.0], [3.0, 1.0, 9.0], [1.0, -1.0, 9.0]))
    out = expert_mlp(x, w, experts, wg, wu, wd)
    _close(out, [[0.75 * ffn0(1) + 0.25 * ffn1(1)], [0.5 * ffn1(2) + 0.5 * ffn0(2)],
                 [ffn1(-1)]])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_expert_mlp_numpy(k):
    r = rng(4)
    x = r.normal(size=(N, D)).astype(np.float32)
    w, experts = _assignment(r, k=k)
    experts[:5] = experts[0]  # some experts crowded, some (likely) idle
    wg, wu, wd = _weights(r)
    _close(jax.jit(expert_mlp)(x, w, experts, wg, wu, wd), _np_expert_mlp(x, w, experts, wg, wu,
                                                                         wd), rtol=1e-5, atol=1e-5)


def test_expert_mlp_numpy_bfloat16_accumulates_in_float32():
    r = rng(5)
    x = r.normal(size=(N, D)).astype(np.float32)
    w, experts = _assignment(r)
    ws = _weights(r)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    out = expert_mlp(bf(x), w, experts, *map(bf, ws))
    assert out.dtype == jnp.bfloat16
    rounded = [np.asarray(bf(a).astype(jnp.float32)) for a in (x, *ws)]
    _close(out.astype(jnp.float32), _np_expert_mlp(rounded[0], w, experts, *rounded[1:]),
           rtol=3e-2, atol=3e-2)


_expert_mlp = jax.jit(expert_mlp)


@given(st.lists(st.lists(st.integers(0, E - 1), min_size=K, max_size=K), min_size=N,
                max_size=N), st.permutations(list(range(N))), st.integers(0, 2**31 - 1))
def test_expert_mlp_property(experts, perm, seed):
    r = rng(seed)
    experts = np.asarray(experts, np.int32)  # repeats within a row allowed: they just add up
    x = r.normal(size=(N, D)).astype(np.float32)
    w = r.random((N, K)).astype(np.float32)
    ws = _weights(r)
    out = _expert_mlp(x, w, experts, *ws)
    # dense form: every token through every expert, weights scattered to [N, E]
    dense_w = np.zeros((N, E), np.float32)
    np.add.at(dense_w, (np.arange(N)[:, None], experts), w)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, ws[0])) * jnp.einsum("nd,edf->nef", x, ws[1])
    _close(out, jnp.einsum("nef,efd,ne->nd", h, ws[2], dense_w), rtol=1e-4, atol=1e-5)
    perm = np.asarray(perm)  # tokens permuted -> outputs permuted; slots permuted -> same
    _close(_expert_mlp(x[perm], w[perm], experts[perm], *ws), out[perm], rtol=1e-5, atol=1e-6)
    _close(_expert_mlp(x, w[:, ::-1], experts[:, ::-1], *ws), out, rtol=1e-5, atol=1e-6)


def test_expert_mlp_grad():
    r = rng(6)
    x = r.normal(size=(N, D)).astype(np.float32)
    w, experts = _assignment(r, k=3)
    ws = _weights(r)
    g_out = r.normal(size=(N, D))
    loss = lambda *a: jnp.sum(expert_mlp(a[0], a[1], experts, *a[2:]) * g_out)  # noqa: E731
    got = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, *ws)
    _, want = _np_expert_mlp(x, w, experts, *ws, g_out=g_out)
    for name, a, b in zip(("x", "weights", "w_gate", "w_up", "w_down"), got, want):
        assert a.shape == b.shape, name
        _close(a, b, rtol=1e-4, atol=1e-5)
    small = (x[:4], w[:4], *ws)  # and finite differences (float32: loose tolerances)
    check_grads(lambda *a: expert_mlp(a[0], a[1], experts[:4], *a[2:]), small, order=1,
                modes=("rev",), atol=5e-2, rtol=5e-2)


def _expert_specs(mesh, e, d, f):
    sizes = {"gate_proj": (e, d, f), "up_proj": (e, d, f), "down_proj": (e, f, d)}
    cfg = type("Cfg", (), {})()
    out = {}
    for name, shape in sizes.items():
        rule = next(r for r in rules.MOE_RULES if re.search(r.pattern, f"mlp/{name}"))
        out[name] = rules._fit(rule, name, shape, cfg, mesh)[0]
    return out


def test_expert_mlp_mesh_8dev():
    mesh = _mesh()
    r = rng(7)
    n = 16
    x = r.normal(size=(n, D)).astype(np.float32)
    w, experts = _assignment(r, n=n, e=8)
    ws = _weights(r, e=8)  # 8 experts split over fsdp=2, F=12 over tensor=2
    specs = _expert_specs(mesh, 8, D, F)
    assert specs["gate_proj"] == P("fsdp", None, "tensor")
    placed = [jax.device_put(a, NamedSharding(mesh, specs[k]))
              for a, k in zip(ws, ("gate_proj", "up_proj", "down_proj"))]
    fn = jax.jit(jax.value_and_grad(
        lambda x, *ws: jnp.sum(jnp.sin(expert_mlp(x, w, experts, *ws))), argnums=(0, 1, 2, 3)))
    single = fn(x, *ws)
    sharded = fn(jax.device_put(x, _batch(mesh)), *placed)
    assert sharded[1][1].sharding.num_devices == 8
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        _close(b, a, rtol=2e-5, atol=2e-6)


def _shapes(text):
    return [tuple(int(v) for v in s.split("x")) for s in re.findall(r"tensor<((?:\d+x)+)", text)
            for s in [s.rstrip("x")]]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_expert_mlp_hlo_has_no_dense_intermediate(platform):
    """Forward and backward, lowered for accelerators: no rank>=3 tensor holds both a token
    axis (N or N*k) and the expert axis E. (JAX's CPU lowering of ragged_dot densifies it,
    see the module docstring, so CPU is not the platform checked.)"""
    def f(x, w, e, *ws):
        return jax.value_and_grad(lambda x, *ws: jnp.sum(expert_mlp(x, w, e, *ws)),
                                  argnums=(0, 1, 2, 3))(x, *ws)
    args = (jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((N, K), jnp.float32),
            jax.ShapeDtypeStruct((N, K), jnp.int32), jax.ShapeDtypeStruct((E, D, F), jnp.float32),
            jax.ShapeDtypeStruct((E, D, F), jnp.float32),
            jax.ShapeDtypeStruct((E, F, D), jnp.float32))
    text = jax.export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()
    main = text.split("func.func private")[0]  # the program, not ragged_dot's fallback body
    assert main.count('"chlo.ragged_dot"') >= 3
    shapes = _shapes(main)
    assert (N * K, D) in shapes and (N * K, F) in shapes
    dense = [s for s in shapes if len(s) >= 3 and E in s and (N in s or N * K in s)]
    assert not dense, dense


# ------------------------------------------------------------------ load_balancing_loss
def test_load_balancing_loss_hand():
    lg = jnp.log(jnp.array([[3.0, 1.0], [1.0, 3.0]]))  # probs (.75, .25), (.25, .75)
    # balanced: f = (1/2, 1/2), P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1 (= k)
    _close(load_balancing_loss(lg, jnp.array([[0], [1]]), num_experts=2, top_k=1), 1.0)
    # both to expert 0: f = (1, 0), P = (1/2, 1/2) -> 2 * 1/2 = 1
    _close(load_balancing_loss(lg, jnp.array([[0], [0]]), num_experts=2, top_k=1), 1.0)
    # second token masked: f = (1, 0), P = (3/4, 1/4) -> 2 * 3/4 = 1.5
    _close(load_balancing_loss(lg, jnp.array([[0], [1]]), jnp.array([1, 0]), num_experts=2,
                               top_k=1), 1.5)
    # nothing counts: 0
    _close(load_balancing_loss(lg, jnp.array([[0], [1]]), jnp.array([0, 0]), num_experts=2,
                               top_k=1), 0.0)
    with pytest.raises(ValueError, match="top_k is 2"):
        load_balancing_loss(lg, jnp.array([[0], [1]]), num_experts=2, top_k=2)


@pytest.mark.parametrize("layers", [(), (3,)])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_numpy(layers, masked):
    r = rng(8)
    logits = r.normal(size=(*layers, N, E)).astype(np.float32)
    experts = np.asarray(route(logits.reshape(-1, E), top_k=K, norm_topk_prob=False)[1])
    experts = experts.reshape(*layers, N, K)
    mask = random_mask(r, 1, N)[0] if masked else None
    got = load_balancing_loss(logits, experts, mask, num_experts=E, top_k=K)
    _close(got, _np_lb_loss(logits, experts, mask, E))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_numpy_matches_transformers(masked):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    r = rng(9)
    b, t, layers = 2, 5, 3
    logits = r.normal(size=(layers, b * t, E)).astype(np.float32)
    mask = random_mask(r, b, t, single_rows=1) if masked else None
    want = hf.load_balancing_loss_func(
        tuple(torch.from_numpy(x) for x in logits), num_experts=E, top_k=K,
        attention_mask=None if mask is None else torch.from_numpy(mask))
    experts = route(logits.reshape(-1, E), top_k=K, norm_topk_prob=False)[1]
    got = load_balancing_loss(logits, experts.reshape(layers, b * t, K),
                              None if mask is None else mask.reshape(-1), num_experts=E, top_k=K)
    _close(got, float(want), rtol=1e-6)


@given(float_array_strategy((6, 4), -6.0, 6.0), st.lists(st.integers(0, 1), min_size=6,
                                                           max_size=6))
def test_load_balancing_loss_property(logits, mask):
    mask = np.asarray(mask, np.float32)
    experts = np.asarray(route(logits, top_k=2, norm_topk_prob=False)[1])
    loss = lambda z, e, m: load_balancing_loss(z, e, m, num_experts=4, top_k=2)  # noqa: E731
    full = loss(logits, experts, mask)
    keep = mask > 0
    if keep.any():  # mask equals slice
        _close(full, loss(logits[keep], experts[keep], None), rtol=1e-5)
    else:
        _close(full, 0.0)
    perm = np.arange(6)[::-1]  # token order does not matter
    _close(loss(logits[perm], experts[perm], mask[perm]), full, rtol=1e-5)
    assert float(full) >= 0.0
    # uniform router with perfectly balanced assignments: exactly k
    balanced = np.array([[0, 1], [2, 3]] * 3, np.int32)
    _close(loss(np.zeros_like(logits), balanced, None), 2.0)


def test_load_balancing_loss_grad():
    r = rng(10)
    logits = r.normal(size=(N, E)).astype(np.float32)
    experts = route(logits, top_k=K, norm_topk_prob=False)[1]
    mask = random_mask(r, 1, N)[0]
    fn = lambda z: load_balancing_loss(z, experts, mask, num_experts=E, top_k=K)  # noqa: E731
    check_grads(fn, (logits,), order=1, modes=("rev",), eps=1e-2, atol=1e-2, rtol=1e-2)
    # analytic: d/dz_r = E * m_r / R * J_softmax(z_r) f, f held fixed
    f = np.zeros(E)
    for row, m in zip(np.asarray(experts), mask):
        f[row] += m / mask.sum()
    p = _np_softmax(logits)
    want = E * (mask / mask.sum())[:, None] * p * (f[None] - (p * f).sum(-1, keepdims=True))
    _close(jax.grad(fn)(logits), want, atol=1e-6)
    g = jax.grad(lambda z: load_balancing_loss(z, experts, np.zeros(N), num_experts=E,
                                               top_k=K))(logits)
    assert np.all(np.isfinite(g)) and not np.any(g)  # empty mask: zero, finite gradient


def test_load_balancing_loss_mesh_8dev():
    mesh = _mesh()
    r = rng(11)
    logits = r.normal(size=(16, E)).astype(np.float32)
    experts = np.asarray(route(logits, top_k=K, norm_topk_prob=False)[1])
    mask = random_mask(r, 1, 16)[0]
    fn = jax.jit(jax.value_and_grad(
        lambda z, e, m: load_balancing_loss(z, e, m, num_experts=E, top_k=K)))
    single = fn(logits, experts, mask)
    sharded = fn(*(jax.device_put(a, _batch(mesh)) for a in (logits, experts, mask)))
    for a, b in zip(single, sharded):
        _close(b, a, rtol=2e-6, atol=1e-7)
