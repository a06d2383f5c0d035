"""Tests of rlhf_jax/parallel/config.py and rules.py: mesh construction and validation, the
per-family rule table (every parameter matched, big matrices really split, hand-computed shard
shapes on each mesh, whole-head fallbacks recorded), batch specs and optimizer-state shardings.

Runs on the 8 virtual CPU devices of ``tests/conftest.py``."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.models import FAMILIES, abstract_params
from rlhf_jax.parallel import (AXES, FAMILY_RULES, MOE_RULES, RULES, MeshConfig, batch_spec,
                               make_mesh, opt_state_shardings, param_shardings, parse_mesh,
                               path_str, plan_param_specs, shard_params)
from rlhf_jax.train import OptimizerConfig, make_optimizer
from tests.parallel.common import CONFIG, IDS, SHAPES, mesh_for, toy_model


def _leaves(tree):
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, NamedSharding))}


# ---------------------------------------------------------------- MeshConfig and make_mesh

@pytest.mark.parametrize("cfg, n, expected", [
    (MeshConfig(), 8, (8, 1, 1)),
    (MeshConfig(data=-1, tensor=2), 8, (4, 1, 2)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=1, fsdp=1, tensor=-1), 8, (1, 1, 8)),
    (MeshConfig(data=2, fsdp=4, tensor=1), 8, (2, 4, 1)),
    (MeshConfig(), 1, (1, 1, 1)),
])
def test_mesh_config_resolves_the_rest(cfg, n, expected):
    assert cfg.resolve(n) == expected


def test_mesh_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=">= 1 or -1"):
        MeshConfig(data=0)
    with pytest.raises(ValueError, match=">= 1 or -1"):
        MeshConfig(tensor=-2)
    with pytest.raises(ValueError, match=r"has 12 = 3 x 2 x 2 devices but 8 are available"):
        MeshConfig(data=3, fsdp=2, tensor=2).resolve(8)
    with pytest.raises(ValueError, match=r"fixed axes use 3, which does not divide 8"):
        MeshConfig(data=-1, fsdp=3).resolve(8)
    with pytest.raises(ValueError, match="device count"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1), jax.devices()[:8])
    with pytest.raises(dataclasses.FrozenInstanceError):
        MeshConfig(data=2).data = 4  # type: ignore[misc]


@pytest.mark.parametrize("text, expected", [
    ("auto", MeshConfig()), ("AUTO", MeshConfig()), ("none", None), ("1", None),
    ("2x4x1", MeshConfig(data=2, fsdp=4, tensor=1)),
    (" -1x2x1 ", MeshConfig(data=-1, fsdp=2, tensor=1)),
])
def test_parse_mesh(text, expected):
    assert parse_mesh(text) == expected


@pytest.mark.parametrize("text", ["", "2x4", "2x4x1x1", "axbxc", "8"])
def test_parse_mesh_rejects(text):
    with pytest.raises(ValueError, match="DATAxFSDPxTENSOR"):
        parse_mesh(text)
    with pytest.raises(ValueError, match="at most one"):
        parse_mesh("-1x-1x1")


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_make_mesh_axes_and_devices(shape):
    mesh = mesh_for(shape)
    assert mesh.axis_names == AXES
    assert tuple(mesh.shape[a] for a in AXES) == shape
    ids = sorted(d.id for d in mesh.devices.flat)
    assert ids == sorted(d.id for d in jax.devices()[:8])  # each device exactly once


def test_make_mesh_on_a_device_subset():
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices")
    mesh = make_mesh(MeshConfig(data=-1, tensor=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devices}


# ---------------------------------------------------------------- the rule table

def test_one_table_per_family_and_families_share_the_layout():
    assert set(FAMILY_RULES) == set(FAMILIES)
    dense = [f for f in FAMILIES if f not in ("qwen3_moe", "mixtral")]
    assert all(FAMILY_RULES[f] is FAMILY_RULES["llama"] for f in dense)
    assert FAMILY_RULES["qwen3_moe"] == FAMILY_RULES["mixtral"] == MOE_RULES + RULES
    for rule in FAMILY_RULES["qwen3_moe"]:
        assert set(a for a in rule.spec if a is not None) <= set(AXES), rule


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_every_moe_param_is_resolved_on_the_8_device_mesh(family):
    """Qwen3-MoE with a dense layer (``mlp_only_layers``) and Mixtral: every parameter gets a
    sharding on each mesh shape; 8 experts split whole over ``fsdp``, each expert's hidden
    over ``tensor``, routers replicated, and the dense layer keeps the dense rules."""
    cfg = CONFIG.replace(family=family, num_layers=2, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=32, qkv_bias=False,
                         mlp_only_layers=(0,) if family == "qwen3_moe" else ())
    params = abstract_params(cfg)
    for shape in SHAPES:
        mesh = mesh_for(shape)
        plan = plan_param_specs(cfg, params, mesh)
        specs, p = _leaves(plan.specs), _leaves(params)
        assert specs.keys() == p.keys()
        for name, spec in specs.items():
            NamedSharding(mesh, spec).shard_shape(p[name].shape)  # raises if invalid
        assert specs["layers/1/mlp/router/kernel"] == P(None, None)
        assert specs["layers/1/mlp/gate_proj"] == P("fsdp", None, "tensor")
        assert specs["layers/1/mlp/down_proj"] == P("fsdp", "tensor", None)
        if family == "qwen3_moe":
            assert specs["layers/0/mlp/gate_proj/kernel"] == P("fsdp", "tensor")
        assert not {k for k in plan.fallbacks if "/mlp/" in k}, plan.fallbacks
    fsdp = NamedSharding(mesh_for((2, 4, 1)), specs["layers/1/mlp/up_proj"])
    assert fsdp.shard_shape(p["layers/1/mlp/up_proj"].shape) == (2, 64, 32)  # 8 experts / 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", [
    dict(tie_embeddings=True, heads=("lm",)),
    dict(tie_embeddings=False, qkv_bias=True, heads=("lm", "value", "reward")),
    dict(tie_embeddings=True, heads=("value",)),
    dict(tie_embeddings=True, qk_norm=True, sandwich_norms=True, norm_unit_offset=True,
         heads=("lm",)),  # Qwen3 / Gemma parameters: q/k norms and the sandwich norms
])
def test_every_param_of_every_family_gets_a_sharding(family, variant):
    cfg = CONFIG.replace(family=family, **variant)
    params = abstract_params(cfg)  # shapes only: nothing allocated
    mesh = mesh_for((2, 2, 2))
    sh = param_shardings(cfg, params, mesh)
    p, s = _leaves(params), _leaves(sh)
    assert p.keys() == s.keys()
    for name, sharding in s.items():
        assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh, name
        assert len(sharding.spec) == p[name].ndim, name  # padded to the rank
        sharding.shard_shape(p[name].shape)  # valid for the shape (raises otherwise)


# Hand-computed per-device shard shapes of the toy model (V=256, D=64, F=128, 8 q heads and 4
# kv heads of width 8) on each mesh (data, fsdp, tensor).
FULL = {
    "embed/embedding": (256, 64), "layers/0/attn/q_proj/kernel": (64, 64),
    "layers/0/attn/k_proj/kernel": (64, 32), "layers/0/attn/v_proj/kernel": (64, 32),
    "layers/0/attn/o_proj/kernel": (64, 64), "layers/0/mlp/gate_proj/kernel": (64, 128),
    "layers/0/mlp/up_proj/kernel": (64, 128), "layers/0/mlp/down_proj/kernel": (128, 64),
    "lm_head/kernel": (64, 256), "layers/0/attn/q_proj/bias": (64,),
    "layers/0/attn/k_proj/bias": (32,), "layers/0/input_norm/weight": (64,),
    "norm/weight": (64,),
}
SHARD = {
    (8, 1, 1): FULL,
    (2, 4, 1): {
        "embed/embedding": (256, 16), "layers/0/attn/q_proj/kernel": (16, 64),
        "layers/0/attn/k_proj/kernel": (16, 32), "layers/0/attn/v_proj/kernel": (16, 32),
        "layers/0/attn/o_proj/kernel": (64, 16), "layers/0/mlp/gate_proj/kernel": (16, 128),
        "layers/0/mlp/up_proj/kernel": (16, 128), "layers/0/mlp/down_proj/kernel": (128, 16),
        "lm_head/kernel": (16, 256), "layers/0/attn/q_proj/bias": (64,),
        "layers/0/attn/k_proj/bias": (32,), "layers/0/input_norm/weight": (64,),
        "norm/weight": (64,)},
    (2, 2, 2): {
        "embed/embedding": (128, 32), "layers/0/attn/q_proj/kernel": (32, 32),
        "layers/0/attn/k_proj/kernel": (32, 16), "layers/0/attn/v_proj/kernel": (32, 16),
        "layers/0/attn/o_proj/kernel": (32, 32), "layers/0/mlp/gate_proj/kernel": (32, 64),
        "layers/0/mlp/up_proj/kernel": (32, 64), "layers/0/mlp/down_proj/kernel": (64, 32),
        "lm_head/kernel": (32, 128), "layers/0/attn/q_proj/bias": (32,),
        "layers/0/attn/k_proj/bias": (16,), "layers/0/input_norm/weight": (64,),
        "norm/weight": (64,)},
    (1, 1, 8): {  # 4 kv heads cannot split 8 ways: k/v stay whole along their heads
        "embed/embedding": (32, 64), "layers/0/attn/q_proj/kernel": (64, 8),
        "layers/0/attn/k_proj/kernel": (64, 32), "layers/0/attn/v_proj/kernel": (64, 32),
        "layers/0/attn/o_proj/kernel": (8, 64), "layers/0/mlp/gate_proj/kernel": (64, 16),
        "layers/0/mlp/up_proj/kernel": (64, 16), "layers/0/mlp/down_proj/kernel": (16, 64),
        "lm_head/kernel": (64, 32), "layers/0/attn/q_proj/bias": (8,),
        "layers/0/attn/k_proj/bias": (32,), "layers/0/input_norm/weight": (64,),
        "norm/weight": (64,)},
}


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_shard_shapes_by_hand(shape):
    _, params = toy_model()
    mesh = mesh_for(shape)
    placed = _leaves(shard_params(params, param_shardings(CONFIG, params, mesh)))
    for name, want in SHARD[shape].items():
        arr = placed[name]
        assert arr.shape == FULL[name], name
        assert arr.sharding.shard_shape(arr.shape) == want, (name, arr.sharding.spec)
        assert {s.data.shape for s in arr.addressable_shards} == {want}, name
        assert len(arr.addressable_shards) == 8


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_big_matrices_are_split_and_memory_drops(shape):
    """Every 2-D matrix with >= 4096 entries is split fsdp*tensor ways, except the k/v kernels
    on tensor=8 (heads); per-device parameter memory falls accordingly."""
    _, params = toy_model()
    mesh = mesh_for(shape)
    ways = mesh.shape["fsdp"] * mesh.shape["tensor"]
    placed = _leaves(shard_params(params, param_shardings(CONFIG, params, mesh)))
    per_device = total = 0
    for name, arr in placed.items():
        n_shard = math.prod(arr.sharding.shard_shape(arr.shape))
        per_device, total = per_device + n_shard, total + arr.size
        if arr.ndim == 2 and arr.size >= 4096:
            kv = "k_proj" in name or "v_proj" in name
            expect = mesh.shape["fsdp"] if (kv and mesh.shape["tensor"] == 8) else ways
            assert arr.size // n_shard == expect, (name, arr.sharding.spec)
    if ways > 1:
        assert per_device < 0.4 * total, (per_device, total)
    else:
        assert per_device == total


def test_fallback_is_per_dimension_and_recorded():
    _, params = toy_model()
    plan = plan_param_specs(CONFIG, params, mesh_for((1, 1, 8)))
    expected = {f"layers/0/attn/{m}_proj/{w}" for m in "kv"
                for w in ("kernel", "bias")}
    assert set(plan.fallbacks) == expected
    assert "num_kv_heads 4" in plan.fallbacks["layers/0/attn/k_proj/kernel"]
    assert "tensor=8" in plan.fallbacks["layers/0/attn/k_proj/kernel"]
    specs = _leaves(jax.tree.map(lambda s: NamedSharding(mesh_for((1, 1, 8)), s), plan.specs,
                                 is_leaf=lambda x: isinstance(x, P)))
    assert specs["layers/0/attn/k_proj/kernel"].spec == P("fsdp", None)  # fsdp part kept
    assert specs["layers/0/attn/q_proj/kernel"].spec == P("fsdp", "tensor")
    # tensor=2 divides 4 kv heads: nothing falls back
    assert plan_param_specs(CONFIG, params, mesh_for((2, 2, 2))).fallbacks == {}


def test_fallback_when_a_dimension_is_not_divisible():
    """Vocab 260 splits 2 ways but not 8: the embedding's vocab dimension falls back."""
    cfg = CONFIG.replace(vocab_size=260, num_kv_heads=8)
    params = abstract_params(cfg)
    plan = plan_param_specs(cfg, params, mesh_for((1, 1, 8)))
    assert set(plan.fallbacks) == {"embed/embedding", "lm_head/kernel"}
    assert "size 260" in plan.fallbacks["embed/embedding"]
    assert plan.specs["embed"]["embedding"] == P(None, "fsdp")
    assert plan.specs["lm_head"]["kernel"] == P("fsdp", None)
    assert plan.specs["layers"][0]["attn"]["k_proj"]["kernel"] == P("fsdp", "tensor")
    assert plan_param_specs(cfg, params, mesh_for((2, 2, 2))).fallbacks == {}


def test_unmatched_parameter_and_unknown_family_are_loud():
    _, params = toy_model()
    extra = dict(params, adapter={"lora_a": np.zeros((64, 4), np.float32)})
    with pytest.raises(ValueError, match="no sharding rule for parameter 'adapter/lora_a'"):
        param_shardings(CONFIG, extra, mesh_for((2, 2, 2)))
    with pytest.raises(ValueError, match="no sharding rules for family 'gpt2'"):
        plan_param_specs(SimpleNamespace(family="gpt2"), params, mesh_for((2, 2, 2)))


# ---------------------------------------------------------------- batch and optimizer state

@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_batch_spec_splits_over_data_and_fsdp_only(shape):
    mesh = mesh_for(shape)
    assert batch_spec(mesh) == P(("data", "fsdp"))
    x = jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
                       NamedSharding(mesh, batch_spec(mesh)))
    rows = 8 // (shape[0] * shape[1])
    assert x.sharding.shard_shape(x.shape) == (rows, 3)
    # devices that differ only in their tensor coordinate hold the same rows
    np.testing.assert_array_equal(np.asarray(x), np.arange(24).reshape(8, 3))


def test_shard_params_keeps_values():
    _, params = toy_model()
    mesh = mesh_for((2, 2, 2))
    sh = param_shardings(CONFIG, params, mesh)
    placed = shard_params(params, sh)
    for (name, a), b in zip(_leaves(placed).items(), _leaves(params).values()):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)
    assert jax.tree.map(lambda a: a.sharding, placed) == sh


@pytest.mark.parametrize("with_params", [False, True])
def test_adam_moments_follow_params_and_counts_replicate(with_params):
    _, params = toy_model()
    mesh = mesh_for((2, 2, 2))
    ps = param_shardings(CONFIG, params, mesh)
    opt = make_optimizer(OptimizerConfig(weight_decay=0.1), total_steps=1000)
    state = jax.eval_shape(opt.init, params)
    oss = opt_state_shardings(state, ps, mesh, params=params if with_params else None)
    mu = optax.tree_utils.tree_get(oss, "mu")
    nu = optax.tree_utils.tree_get(oss, "nu")
    assert mu == ps and nu == ps
    n_counts = 0
    for name, sh in _leaves(oss).items():
        if name.endswith("count"):
            n_counts += 1
            assert sh.spec == P(), name
    assert n_counts >= 1
    # jit places a freshly initialised state where the shardings say
    placed = jax.jit(opt.init, out_shardings=oss)(shard_params(params, ps))
    mu_arr = optax.tree_utils.tree_get(placed, "mu")
    assert mu_arr["layers"][0]["mlp"]["gate_proj"]["kernel"].sharding == \
        ps["layers"][0]["mlp"]["gate_proj"]["kernel"]


def test_opt_state_leaf_with_a_different_shape_is_replicated():
    """Same path suffix as a parameter but another shape (a factored statistic) -> replicated;
    a leaf matching no parameter path -> replicated."""
    _, params = toy_model()
    mesh = mesh_for((2, 2, 2))
    ps = param_shardings(CONFIG, params, mesh)
    state = {"v_row": {"lm_head": {"kernel": jnp.zeros((64,))}},
             "v_col": {"lm_head": {"kernel": jnp.zeros((8, 256))}},
             "same": {"lm_head": {"kernel": jnp.zeros((64, 256))}},
             "other": {"scale": jnp.zeros((64, 256))}}
    for with_params in (None, params):
        oss = opt_state_shardings(state, ps, mesh, params=with_params)
        assert oss["same"]["lm_head"]["kernel"] == ps["lm_head"]["kernel"]
        assert oss["v_row"]["lm_head"]["kernel"].spec == P()
        assert oss["other"]["scale"].spec == P()
    # (8, 256) fits the (fsdp, tensor) sharding's rank and divisibility: only the exact shape
    # check (with params) rejects it
    assert opt_state_shardings(state, ps, mesh, params=params)["v_col"]["lm_head"][
        "kernel"].spec == P()
