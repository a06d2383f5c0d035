"""Model configuration for the Llama / Qwen2 / Mistral decoder family, and size presets.

One frozen dataclass covers the three families: they differ only in QKV bias (Qwen2), rotary
scaling (Llama 3), sliding-window attention (Mistral) and embedding tying. Field names follow
Hugging Face's ``config.json`` where one exists, so ``models.hf`` maps them one to one.
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("llama", "qwen2", "mistral")
HEADS = ("lm", "value", "reward")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style frequency-dependent rotary scaling (HF ``rope_type: llama3``)."""

    factor: float = 8.0
    """How much longer the target context is than the original."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pre-trained with."""

    def __post_init__(self):
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"invalid llama3 rope scaling {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

    family: str = "llama"
    """One of ``FAMILIES``; chooses the Hugging Face architecture on export."""
    vocab_size: int = 1024
    """Number of token embeddings."""
    hidden_size: int = 128
    """Model width ``D``."""
    intermediate_size: int = 344
    """SwiGLU hidden width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide ``num_heads``."""
    head_dim: int | None = None
    """Per-head width; ``hidden_size // num_heads`` when None."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    rope_scaling: RopeScaling | None = None
    """Llama-3 rotary scaling, or None for plain RoPE."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    tie_embeddings: bool = False
    """Share the input embedding with the LM head."""
    sliding_window: int | None = None
    """Mistral's attention window in tokens (None: full causal attention)."""
    max_position_embeddings: int = 2048
    """Longest context the model supports (cache sizes are checked against it)."""
    param_dtype: str = "float32"
    """Storage dtype of the parameters."""
    dtype: str = "float32"
    """Compute dtype of activations; logits, softmax and norms are always float32."""
    heads: tuple[str, ...] = ("lm",)
    """Output heads: ``lm`` (next-token logits), ``value`` (per token), ``reward`` (scalar)."""
    remat: bool = False
    """Rematerialise each block in the backward pass (gradient checkpointing)."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads when head_dim is None")
        if (self.head_dim or self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        bad = [h for h in self.heads if h not in HEADS]
        if bad or not self.heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {self.heads}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError("sliding_window must be >= 1 or None")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (LM head counted once when tied), for presets and MFU figures."""
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        n = self.num_layers * per_layer + v * d + d
        if "lm" in self.heads and not self.tie_embeddings:
            n += v * d
        n += (d + 1) * ("value" in self.heads) + d * ("reward" in self.heads)  # reward: no bias
        return n


PRESETS: dict[str, ModelConfig] = {
    # ~1M parameters: unit tests and CPU smoke runs.
    "toy-1m": ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=4,
                          num_heads=4, num_kv_heads=2, tie_embeddings=True),
    # ~10M: the embedded tasks on a laptop CPU.
    "tiny-10m": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688,
                            num_layers=8, num_heads=8, num_kv_heads=4, tie_embeddings=True),
    # ~110M: benchmarks with d_model >= 512.
    "small-110m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                              num_layers=12, num_heads=12, num_kv_heads=4,
                              tie_embeddings=True),
    # Llama-3.2-1B's architecture (1.24B parameters).
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        tie_embeddings=True, max_position_embeddings=131072),
    # Qwen2.5-0.5B's architecture (0.49B parameters).
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
    # Qwen2.5-1.5B's architecture (1.54B parameters).
    "qwen2.5-1.5b": ModelConfig(
        family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        qkv_bias=True, tie_embeddings=True, max_position_embeddings=32768),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name with field overrides, e.g. ``get_preset("toy-1m", heads=("reward",))``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
