"""Decoder-only transformer (Llama / Qwen2 / Mistral) as a params pytree plus pure functions."""

from rlhf_jax.models.config import FAMILIES, HEADS, PRESETS, ModelConfig, RopeScaling, get_preset
from rlhf_jax.models.transformer import (
    KVCache,
    Model,
    ModelOutput,
    abstract_params,
    init_model,
)

__all__ = [
    "FAMILIES", "HEADS", "PRESETS", "ModelConfig", "RopeScaling", "get_preset",
    "KVCache", "Model", "ModelOutput", "init_model", "abstract_params",
]
from rlhf_jax.models.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
__all__ += ["load_hf_checkpoint", "save_hf_checkpoint"]
