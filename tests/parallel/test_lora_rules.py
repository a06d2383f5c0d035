"""LoRA / QLoRA params under the family sharding rules (``parallel.rules.adapter_rules``): every
adapter and quantised param resolves on the four 8-device meshes, ``lora_a`` splits its input
dimension like the base kernel, ``lora_b`` its output dimension, ``r`` is never split; and a
sharded QLoRA forward equals the unsharded one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import abstract_params
from rlhf_jax.models.lora import (LoraConfig, abstract_lora_params, combine, init_adapter,
                                  lora_model, quantize_base)
from rlhf_jax.parallel import param_shardings, path_str, plan_param_specs, shard_params
from tests.parallel.common import CONFIG, IDS, SHAPES, mesh_for, toy_model


def _specs(params, mesh) -> dict[str, P]:
    plan = plan_param_specs(CONFIG, params, mesh)
    return {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        plan.specs, is_leaf=lambda x: isinstance(x, P))}


@pytest.mark.parametrize("quant", [None, "int8", "nf4"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_lora_params_follow_their_kernels_rule(shape, quant):
    mesh = mesh_for(shape)
    base = _specs(abstract_params(CONFIG), mesh)
    model = lora_model(CONFIG, LoraConfig(rank=4, quantize_base=quant))
    specs = _specs(abstract_lora_params(model), mesh)
    linears = sorted({name.rsplit("/", 1)[0] for name in specs if name.endswith("/lora_a")})
    assert len(linears) == 7 * CONFIG.num_layers
    for lin in linears:
        d_in, d_out = base[f"{lin}/kernel"]
        assert specs[f"{lin}/lora_a"] == P(d_in, None), lin
        assert specs[f"{lin}/lora_b"] == P(None, d_out), lin
        if quant == "int8":
            assert specs[f"{lin}/kernel_int8"] == base[f"{lin}/kernel"]
            assert specs[f"{lin}/kernel_scale"] == P(d_out)
        elif quant == "nf4":  # packed input rows: [in/2, out]; these sizes all divide
            assert specs[f"{lin}/kernel_nf4"] == base[f"{lin}/kernel"]
            assert specs[f"{lin}/kernel_absmax"] == P(None, d_out)
    if shape == (2, 4, 1):  # something is really split
        assert specs["layers/0/mlp/gate_proj/lora_a"] == P("fsdp", None)
    if shape == (1, 1, 8):
        assert specs["layers/0/attn/q_proj/lora_b"] == P(None, "tensor")


def test_sharded_qlora_forward_equals_unsharded():
    mesh = mesh_for((2, 2, 2))
    base_model, base = toy_model()
    model = lora_model(base_model, LoraConfig(rank=4, quantize_base="nf4"))
    qbase = quantize_base(base, model)
    ad = jax.tree.map(lambda x: x + 0.01, init_adapter(model, jax.random.PRNGKey(1)))
    params = jax.tree.map(np.asarray, combine(qbase, ad))
    tokens = jnp.asarray(np.arange(32).reshape(4, 8) % CONFIG.vocab_size)

    def logits(p, t):
        return model.logits(p, model.apply(p, t).hidden)

    want = jax.jit(logits)(params, tokens)
    sharded = shard_params(params, param_shardings(CONFIG, params, mesh))
    got = jax.jit(logits)(sharded, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)
