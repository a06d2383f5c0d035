"""Decoder-only transformer (Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3, Qwen3-MoE, Mixtral) as a
params pytree plus pure functions."""

from rlhf_jax.models.config import FAMILIES, HEADS, PRESETS, ModelConfig, RopeScaling, get_preset
from rlhf_jax.models.transformer import (
    KVCache,
    Model,
    ModelOutput,
    abstract_params,
    init_model,
    model_for,
    moe_aux_loss,
    remat_compiler_options,
)

__all__ = [
    "FAMILIES", "HEADS", "PRESETS", "ModelConfig", "RopeScaling", "get_preset",
    "KVCache", "Model", "ModelOutput", "init_model", "model_for", "abstract_params",
    "moe_aux_loss", "remat_compiler_options",
]
from rlhf_jax.models.hf import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
__all__ += ["load_hf_checkpoint", "save_hf_checkpoint"]
from rlhf_jax.models.scoring import (  # noqa: E402
    CompletionScores,
    completion_values,
    score_completions,
    sequence_logprob_sums,
    sequence_rewards,
    token_batch_logits,
    token_batch_logprobs,
    token_batch_rewards,
)
__all__ += ["CompletionScores", "completion_values", "score_completions",
            "sequence_logprob_sums", "sequence_rewards", "token_batch_logits",
            "token_batch_logprobs", "token_batch_rewards"]
from rlhf_jax.models.moe import (  # noqa: E402
    MoEMLP,
    expert_mlp,
    load_balancing_loss,
    moe_params_from_hf,
    moe_params_to_hf,
    route,
)
__all__ += ["MoEMLP", "route", "expert_mlp", "load_balancing_loss", "moe_params_from_hf",
            "moe_params_to_hf"]

from rlhf_jax.models.lora import (  # noqa: E402
    LoraConfig,
    LoraModel,
    adapter_shapes,
    combine,
    init_adapter,
    lora_model,
    merge_adapter,
    quantize_base,
    split,
)
from rlhf_jax.models.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402
__all__ += ["LoraConfig", "LoraModel", "adapter_shapes", "combine", "init_adapter", "lora_model",
            "merge_adapter", "quantize_base", "split", "load_peft_adapter", "save_peft_adapter"]
