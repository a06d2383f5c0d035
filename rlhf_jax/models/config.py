"""Model configuration for one decoder covering Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3 and the
mixtures of experts Qwen3-MoE and Mixtral.

One frozen dataclass covers the families; each is a setting of a few switches over the same
pre-norm decoder (``models.layers``):

========  ================================================================================
llama     RMSNorm, RoPE (optionally Llama-3 scaled), GQA, SwiGLU
qwen2     + q/k/v biases
qwen3     + per-head RMSNorm on q and k before RoPE (``qk_norm``), ``head_dim`` free
mistral   + one sliding window on every layer
phi3      Llama's maths; the checkpoint fuses ``qkv_proj`` and ``gate_up_proj`` (``models.hf``)
gemma2    ``(1 + w)`` RMSNorm in float32, norms before *and* after attention and MLP, embeddings
          times ``sqrt(D)``, GeGLU (tanh GELU), ``query_pre_attn_scalar``, tanh soft-caps on
          attention and final logits, alternating sliding / global layers
gemma3    Gemma 2 with ``qk_norm`` instead of the attention cap, and a separate RoPE base
          (``rope_local_theta``) for the sliding layers
qwen3_moe Qwen3 with ``num_experts`` SwiGLU experts (``models.moe.MoEMLP``) in the sparse layers
          (``decoder_sparse_step``, ``mlp_only_layers``; the others keep the dense MLP)
mixtral   Mistral with a mixture of experts in every layer (top-k weights renormalised)
========  ================================================================================

Field names follow Hugging Face's ``config.json`` where one exists, so ``models.hf`` maps them
one to one. The family only chooses the Hugging Face architecture on export; which switches a
family needs is checked there (``models._hf_config``), so any combination can be trained.
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3", "qwen3_moe",
            "mixtral")
ACTIVATIONS = ("silu", "gelu_tanh")
"""MLP gate activations: SiLU (SwiGLU) and tanh-approximated GELU (GeGLU, HF
``gelu_pytorch_tanh``)."""
LAYER_TYPES = ("full_attention", "sliding_attention")
"""Per-layer attention kinds, spelled as Hugging Face's ``layer_types``."""
ROPE_TYPES = ("llama3", "linear")
"""``RopeScaling.rope_type`` values (HF ``rope_type``; plain RoPE is ``rope_scaling=None``)."""
MLP_KINDS = ("dense", "moe")
"""Per-layer feed-forward kinds (keys of ``layers.MLPS``): the gated MLP or a mixture of experts."""
HEADS = ("lm", "value", "reward")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary scaling: Llama-3 frequency-dependent (HF ``rope_type: llama3``) or linear position
    interpolation (``linear``: every inverse frequency divided by ``factor``, Chen et al. 2023)."""

    rope_type: str = "llama3"
    """``llama3`` or ``linear`` (``ROPE_TYPES``); ``linear`` reads ``factor`` only."""
    factor: float = 8.0
    """How much longer the target context is than the original."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pre-trained with."""

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.factor <= 0 or (self.rope_type == "llama3"
                                and self.high_freq_factor <= self.low_freq_factor):
            raise ValueError(f"invalid {self.rope_type} rope scaling {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only transformer: RMSNorm, RoPE, grouped-query attention, gated MLP or mixture of
    experts."""

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
    """Rotary scaling (of the global layers when ``rope_local_theta`` is set), or None."""
    rope_local_theta: float | None = None
    """Gemma 3: plain-RoPE base of the sliding layers (HF ``rope_local_base_freq``); None: every
    layer uses ``rope_theta`` and ``rope_scaling``."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    tie_embeddings: bool = False
    """Share the input embedding with the LM head."""
    sliding_window: int | None = None
    """Attention window in tokens of the sliding layers (None: full causal attention)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer ``full_attention`` or ``sliding_attention`` (Gemma); None: every layer slides
    when ``sliding_window`` is set (Mistral, Phi-3), none otherwise."""
    qk_norm: bool = False
    """Qwen3 / Gemma 3: RMSNorm over each head's q and k (own weights), before RoPE."""
    norm_unit_offset: bool = False
    """Gemma: RMSNorm scales by ``1 + w`` (weights start at 0) and multiplies in float32."""
    sandwich_norms: bool = False
    """Gemma 2/3: also normalise the attention and MLP outputs before the residual add."""
    scale_embeddings: bool = False
    """Gemma: multiply the embeddings by ``sqrt(hidden_size)`` (in the compute dtype)."""
    mlp_activation: str = "silu"
    """Gate activation of the MLP, one of ``ACTIVATIONS`` (Gemma: ``gelu_tanh``)."""
    query_pre_attn_scalar: float | None = None
    """Gemma: attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (None:
    ``head_dim ** -0.5``)."""
    attn_logit_softcap: float | None = None
    """Gemma 2: attention scores become ``cap * tanh(scores / cap)`` before the mask."""
    final_logit_softcap: float | None = None
    """Gemma 2: next-token logits become ``cap * tanh(logits / cap)`` (float32)."""
    num_experts: int = 0
    """Experts per mixture-of-experts layer (HF ``num_experts``/``num_local_experts``); 0: dense."""
    num_experts_per_tok: int = 2
    """Experts each token is routed to (top-k), in ``[1, num_experts]``."""
    moe_intermediate_size: int | None = None
    """One expert's SwiGLU hidden width (None: ``intermediate_size``)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (Mixtral always; Qwen3-MoE's flag)."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing auxiliary loss (``moe.moe_aux_loss``) in training."""
    decoder_sparse_step: int = 1
    """Qwen3-MoE: layer ``i`` is sparse when ``(i + 1) % decoder_sparse_step == 0``..."""
    mlp_only_layers: tuple[int, ...] = ()
    """... and ``i`` is not in ``mlp_only_layers`` (these keep the dense MLP)."""
    max_position_embeddings: int = 2048
    """Longest context the model supports (cache sizes are checked against it)."""
    param_dtype: str = "float32"
    """Storage dtype of the parameters."""
    dtype: str = "float32"
    """Compute dtype of activations; logits, softmax and norms are always float32."""
    heads: tuple[str, ...] = ("lm",)
    """Output heads: ``lm`` (next-token logits), ``value`` (per token), ``reward`` (scalar)."""
    remat: bool = False
    """Rematerialise each block in the backward pass (gradient checkpointing); on CPU, compile
    your own differentiated programs with ``remat_compiler_options()`` (the trainer does)."""

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
        self._check_layers()
        self._check_experts()
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {ACTIVATIONS}, got "
                             f"{self.mlp_activation!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                     "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")

    def _check_layers(self):
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types must be a tuple of num_layers={self.num_layers} "
                             f"entries, got {self.layer_types!r}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types entries must be in {LAYER_TYPES}, got {bad}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is "
                             "None; give the window size")

    def _check_experts(self):
        layers = self.mlp_only_layers
        if not isinstance(layers, tuple) or len(set(layers)) != len(layers) or not all(
                isinstance(i, int) and 0 <= i < self.num_layers for i in layers):
            raise ValueError(f"mlp_only_layers must be a tuple of distinct layer indices in "
                             f"[0, {self.num_layers}), got {layers!r}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.moe_intermediate_size is not None and self.moe_intermediate_size < 1:
            raise ValueError("moe_intermediate_size must be >= 1 or None")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0: dense), got {self.num_experts}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.num_experts and self.mlp_activation != "silu":
            raise ValueError("mixture-of-experts layers are SwiGLU: mlp_activation must be 'silu'")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def expert_size(self) -> int:
        """One expert's hidden width ``F`` (``moe_intermediate_size`` or ``intermediate_size``)."""
        return self.moe_intermediate_size or self.intermediate_size

    def mlp_kinds(self) -> tuple[str, ...]:
        """Per layer, the key of ``layers.MLPS`` building its MLP: ``moe`` where a layer is
        sparse (HF ``Qwen3MoeDecoderLayer``: ``num_experts > 0``, ``(i + 1) %
        decoder_sparse_step == 0`` and ``i`` not in ``mlp_only_layers``), else ``dense``."""
        return tuple("moe" if self.num_experts and (i + 1) % self.decoder_sparse_step == 0
                     and i not in self.mlp_only_layers else "dense"
                     for i in range(self.num_layers))

    def layer_is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend through ``sliding_window`` (see ``layer_types``)."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (LM head counted once when tied), for presets and MFU figures."""
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 2 * d * (1 + self.sandwich_norms) + 2 * h * self.qk_norm
        moe = d * self.num_experts + 3 * self.num_experts * d * self.expert_size  # router, experts
        n = sum(per_layer + (moe if kind == "moe" else 3 * d * f) for kind in self.mlp_kinds())
        n += v * d + d
        if "lm" in self.heads and not self.tie_embeddings:
            n += v * d
        n += (d + 1) * ("value" in self.heads) + d * ("reward" in self.heads)  # reward: no bias
        return n


_GEMMA = dict(norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True,
              mlp_activation="gelu_tanh", rms_norm_eps=1e-6, tie_embeddings=True)

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
    # Qwen3-0.6B's architecture (0.6B parameters; q/k norms, head_dim 128 != 1024 / 16).
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, qk_norm=True, tie_embeddings=True, max_position_embeddings=40960),
    # Phi-3-mini-4k's architecture (3.8B parameters; its 2047-token window on every layer).
    "phi-3-mini-4k": ModelConfig(
        family="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
        num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
        sliding_window=2047, max_position_embeddings=4096),
    # Gemma-2-2B's architecture (2.6B parameters): sliding / global layers alternate.
    "gemma-2-2b": ModelConfig(
        family="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, sliding_window=4096,
        layer_types=("sliding_attention", "full_attention") * 13, query_pre_attn_scalar=256,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, max_position_embeddings=8192,
        **_GEMMA),
    # Gemma-3-1B's architecture (1.0B parameters): five sliding layers per global one.
    "gemma-3-1b": ModelConfig(
        family="gemma3", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
        num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, sliding_window=512,
        layer_types=tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                          for i in range(26)),
        rope_theta=1000000.0, rope_local_theta=10000.0, query_pre_attn_scalar=256,
        qk_norm=True, max_position_embeddings=32768, **_GEMMA),
    # Qwen3-30B-A3B's architecture (30.5B parameters, 3.3B active: 8 of 128 experts per token).
    "qwen3-30b-a3b": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, qk_norm=True, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, max_position_embeddings=40960),
    # Mixtral-8x7B's architecture (46.7B parameters, 12.9B active: 2 of 8 experts per token).
    "mixtral-8x7b": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-5,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
        max_position_embeddings=32768),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name with field overrides, e.g. ``get_preset("toy-1m", heads=("reward",))``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
