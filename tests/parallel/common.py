"""Shared pieces of the parallel/ tests: the four mesh shapes on 8 devices and a toy model whose
dimensions the axes divide (except 4 key/value heads on ``tensor=8``, which must fall back)."""

from __future__ import annotations

import functools

import jax
import pytest

from rlhf_jax.models import get_preset, init_model
from rlhf_jax.parallel import MeshConfig, make_mesh

# (data, fsdp, tensor)
SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
IDS = ["x".join(map(str, s)) for s in SHAPES]

CONFIG = get_preset("toy-1m", family="qwen2", vocab_size=256, hidden_size=64,
                    intermediate_size=128, num_layers=1, num_heads=8, num_kv_heads=4,
                    qkv_bias=True, tie_embeddings=False)


def mesh_for(shape):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return _mesh(tuple(shape))


@functools.lru_cache(maxsize=None)
def _mesh(shape):
    d, f, t = shape
    return make_mesh(MeshConfig(data=d, fsdp=f, tensor=t), jax.devices()[:8])


@functools.lru_cache(maxsize=None)
def toy_model(config=CONFIG):
    """``(model, host params)``; params as NumPy so no test shares (or donates) device arrays."""
    model, params = init_model(config, jax.random.PRNGKey(0))
    return model, jax.tree.map(lambda x: jax.device_get(x), params)
