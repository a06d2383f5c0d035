"""Tests of ``models.moe.MoEMLP``: its parameters and call, its sharding rules, parity with the
transformers Qwen3-MoE and Mixtral sparse blocks, and the Hugging Face weight layouts (the pure
functions are tested in ``test_moe.py``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import moe
from rlhf_jax.models.moe import MoEMLP, route
from rlhf_jax.parallel import rules
from tests.models.test_moe import D, E, F, _close, _np_expert_mlp, _weights
from tests.helpers import rng
from tests.parallel.common import mesh_for


@functools.lru_cache(maxsize=None)
def _graph(norm=True, d=16, f=12, e=6, k=2, dtype=jnp.float32):
    """``(graphdef, abstract state)``: built by ``eval_shape``, so no random init is compiled."""
    return nnx.split(nnx.eval_shape(lambda: MoEMLP(
        hidden_size=d, moe_intermediate_size=f, num_experts=e, top_k=k, norm_topk_prob=norm,
        dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))))


def _bound(params, norm=True, **kw) -> MoEMLP:
    """A fresh ``MoEMLP`` holding ``params`` (a pure dict)."""
    graphdef, abstract = _graph(norm, **kw)
    state = jax.tree.map(lambda a: a, abstract)  # replace_by_pure_dict writes in place
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def test_moe_mlp_params_and_call():
    m = MoEMLP(hidden_size=16, moe_intermediate_size=12, num_experts=6, top_k=2,
               norm_topk_prob=True, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(m))
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {"router": {"kernel": (16, 6)}, "gate_proj": (6, 16, 12),
                      "up_proj": (6, 16, 12), "down_proj": (6, 12, 16)}
    x = jnp.asarray(rng(12).normal(size=(2, 5, 16)), jnp.float32)
    out, logits = m(x)
    assert out.shape == (2, 5, 16) and logits.shape == (10, 6) and logits.dtype == jnp.float32
    w, e = route(logits, top_k=2, norm_topk_prob=True)
    _close(out.reshape(10, 16), _np_expert_mlp(x.reshape(10, 16), w, e, params["gate_proj"],
                                               params["up_proj"], params["down_proj"]),
           rtol=1e-5, atol=1e-6)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(_bound(p)(x)[0])))(params)
    assert all(np.all(np.isfinite(g)) and np.any(g) for g in jax.tree.leaves(grads))
    assert np.any(grads["router"]["kernel"])  # the router learns through the combine weights
    bf = _bound(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), dtype=jnp.bfloat16)
    out, logits = bf(x)
    assert out.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="top_k=7"):
        _graph(k=7)


def test_moe_rules_shard_every_param(monkeypatch):
    mesh = mesh_for((2, 2, 2))
    monkeypatch.setitem(rules.FAMILY_RULES, "moe_test", rules.MOE_RULES + rules.RULES)
    cfg = type("Cfg", (), {"family": "moe_test"})()
    params = {"layers": {"0": {"mlp": nnx.to_pure_dict(_graph(e=8)[1])}}}  # shapes only
    plan = rules.plan_param_specs(cfg, params, mesh)
    specs = plan.specs["layers"]["0"]["mlp"]
    assert specs == {"router": {"kernel": P(None, None)}, "gate_proj": P("fsdp", None, "tensor"),
                     "up_proj": P("fsdp", None, "tensor"),
                     "down_proj": P("fsdp", "tensor", None)}
    assert not plan.fallbacks
    assert rules.plan_param_specs(  # 6 experts on fsdp=4 fall back to replicated experts
        cfg, {"mlp": params["layers"]["0"]["mlp"] | {"gate_proj": np.zeros((6, 16, 12))}},
        mesh_for((2, 4, 1))).fallbacks


def _hf_block(family, norm, d=16, f=12, e=6, k=2):
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "qwen3_moe":
        cfg = tr.Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=e,
                                num_experts_per_tok=k, norm_topk_prob=norm)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        block = Qwen3MoeSparseMoeBlock(cfg)
    else:
        cfg = tr.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                               num_experts_per_tok=k)
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return torch, block.eval()


@pytest.mark.parametrize("family,norm", [("qwen3_moe", True), ("qwen3_moe", False),
                                         ("mixtral", True)])
@pytest.mark.parametrize("layout", ["fused", "hub"])
def test_moe_mlp_matches_transformers(family, norm, layout):
    torch, block = _hf_block(family, norm)
    sd = {f"blk.{k}": v.detach().numpy() for k, v in block.state_dict().items()}
    params = moe.moe_params_from_hf(sd, "blk", family=family, num_experts=6)
    if layout == "hub":  # the per-expert names save_pretrained writes, read back
        hub = moe.moe_params_to_hf(params, "blk", family=family)
        assert sorted(hub) == sorted(moe.hf_moe_keys("blk", family=family, num_experts=6))
        params = moe.moe_params_from_hf(hub, "blk", family=family, num_experts=6)
    m = _bound(params, norm)
    x = rng(13).normal(size=(3, 7, 16)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
        want_logits = block.gate(torch.from_numpy(x).reshape(-1, 16))[0].numpy()
    out, logits = m(jnp.asarray(x))
    err = float(np.max(np.abs(np.asarray(out) - want)))
    assert err <= 1e-5, err
    _close(logits, want_logits, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_hf_names_are_what_save_pretrained_writes(tmp_path, family):
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    from safetensors.numpy import load_file
    common = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2)
    cfg = (tr.Qwen3MoeConfig(moe_intermediate_size=12, num_experts=4, **common)
           if family == "qwen3_moe" else
           tr.MixtralConfig(intermediate_size=12, num_local_experts=4, **common))
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    stored = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0." + ("mlp" if family == "qwen3_moe" else "block_sparse_moe")
    keys = moe.hf_moe_keys(prefix, family=family, num_experts=4)
    assert set(keys) <= set(stored), sorted(set(keys) - set(stored))
    ours = moe.moe_params_from_hf(stored, prefix, family=family, num_experts=4)
    live = {f"p.{k}": v.detach().numpy()
            for k, v in model.model.layers[0].mlp.state_dict().items()}
    jax.tree.map(np.testing.assert_array_equal, ours,
                 moe.moe_params_from_hf(live, "p", family=family, num_experts=4))


def test_moe_hf_layout_round_trips():
    r = rng(14)
    ws = _weights(r)
    gu, down = moe.to_fused(*ws)
    assert gu.shape == (E, 2 * F, D) and down.shape == (E, D, F)
    for a, b in zip(moe.from_fused(gu, down), ws):
        np.testing.assert_array_equal(a, b)
    per = moe.unstack_experts(*ws)
    assert per[0][0].shape == (F, D) and per[2][0].shape == (D, F)
    for a, b in zip(moe.stack_experts(*per), ws):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(gu[3, :F], per[0][3])  # gate rows first, then up
    np.testing.assert_array_equal(gu[3, F:], per[1][3])
