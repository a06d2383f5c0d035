"""A stage's models and mesh: load or initialise a model, check lengths against it, build the
mesh and place params by the family's sharding rules. Every check here runs before anything is
compiled.
"""

from __future__ import annotations

from typing import Mapping

import jax

from rlhf_jax import parallel
from rlhf_jax.models import ModelConfig, get_preset, init_model, load_hf_checkpoint, model_for
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines.config import ModelSpec


def load_model(spec: ModelSpec, *, heads: tuple[str, ...], vocab_size: int, seed: int):
    """``(Model, params)`` with exactly ``heads``; heads the checkpoint lacks start at zero."""
    if spec.path is not None:
        config, params = load_hf_checkpoint(spec.path, dtype=spec.dtype, heads=heads)
        if config.vocab_size < vocab_size:
            raise ValueError(f"model at {spec.path} has vocab_size {config.vocab_size} < the "
                             f"tokenizer's {vocab_size}")
        return model_for(config), params
    extra = {"param_dtype": spec.dtype, "dtype": spec.dtype} if spec.dtype else {}
    config = get_preset(spec.preset, vocab_size=vocab_size, heads=heads,
                        **dict(spec.overrides), **extra)
    return init_model(config, jax.random.PRNGKey(seed))


def check_sequence_fits(models: Mapping[str, ModelConfig], *, max_prompt_length: int,
                        max_new_tokens: int) -> None:
    """Prompt + completion must fit every model's positions (the sampler's KV cache has
    ``max_prompt_length + max_new_tokens`` slots); checked before anything is compiled."""
    need = max_prompt_length + max_new_tokens
    for name, config in models.items():
        if need > config.max_position_embeddings:
            raise ValueError(
                f"data.max_prompt_length {max_prompt_length} + sampling.max_new_tokens "
                f"{max_new_tokens} = {need} tokens exceeds the {name} model's "
                f"max_position_embeddings {config.max_position_embeddings} (the KV cache and "
                f"position limit); lower max_prompt_length or max_new_tokens")


def make_mesh(mesh: MeshConfig | None, batch_size: int, *, what: str = "data.batch_size"):
    """The stage's ``data x fsdp x tensor`` mesh over all devices (every process's), or None
    when ``mesh`` is None or there is one device (plain single-device jit).

    Raises when ``batch_size`` does not split evenly over ``data x fsdp`` (checked before
    anything is compiled), and for ``mesh=None`` in a multi-process run (every process would
    train its own copy, and checkpoints cannot hold process-local arrays).
    """
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"mesh=None runs on one device, but this is a run of "
                         f"{jax.process_count()} processes; give a mesh (MeshConfig(): data "
                         f"parallel over all {jax.device_count()} devices)")
    if mesh is None or jax.device_count() == 1:
        return None
    built = parallel.make_mesh(mesh)
    rows = parallel.batch_size_divisor(built)
    if batch_size % rows:
        shape = dict(built.shape)
        raise ValueError(f"{what} {batch_size} is not divisible by data x fsdp = {rows} (mesh "
                         f"{shape} over {jax.device_count()} devices); change {what} or the "
                         f"mesh (mesh=None: one device)")
    return built


def model_shardings(mesh, config: ModelConfig, params):
    """``params``' shardings by the family's rules (``parallel.param_shardings``); None
    without a mesh."""
    return None if mesh is None else parallel.param_shardings(config, params, mesh)


def place(tree, shardings):
    """``parallel.put`` when there are shardings, the tree unchanged otherwise."""
    return tree if shardings is None else parallel.put(tree, shardings)
