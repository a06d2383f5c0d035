"""``config.json`` <-> ``ModelConfig`` for ``models.hf``, one visible table per concern.

A family is a Hugging Face architecture plus a fixed setting of our switches (``TRAITS``): on
import the family sets them; on export a config whose switches differ from its family's is
refused (it has no Hugging Face equivalent). Features a family cannot express (a sliding window
on Qwen, soft-caps outside Gemma, ...) are refused the same way, naming the field. Defaults for
keys a ``config.json`` leaves out are the transformers 5.24 class defaults (``head_dim`` 256 for
Gemma, 128 for Qwen3, tied embeddings for Gemma, RoPE base 10^6 for Mixtral, ...), so a sparse
file reads as transformers reads it.

Mixtures of experts (HF ``configuration_qwen3_moe.py``, ``configuration_mixtral.py``): the expert
count is ``num_experts`` or ``num_local_experts`` (transformers 5 aliases them and writes the
latter for both), Mixtral's experts are ``intermediate_size`` wide with every layer sparse and
renormalised top-k weights, Qwen3-MoE's are ``moe_intermediate_size`` wide with dense layers by
``mlp_only_layers``/``decoder_sparse_step`` (``intermediate_size`` wide).
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.models.config import DTYPES, HEADS, LAYER_TYPES, ModelConfig, RopeScaling

# family -> (model_type, *ForCausalLM architecture, one-label *ForSequenceClassification).
FAMILY_HF = {
    "llama": ("llama", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "mistral": ("mistral", "MistralForCausalLM", "MistralForSequenceClassification"),
    "phi3": ("phi3", "Phi3ForCausalLM", "Phi3ForSequenceClassification"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification"),
    "mixtral": ("mixtral", "MixtralForCausalLM", "MixtralForSequenceClassification"),
}
# Hugging Face architecture -> (family, head its checkpoint carries).
ARCHITECTURES = {arch: (fam, head) for fam, (_, lm, cls) in FAMILY_HF.items()
                 for arch, head in ((lm, "lm"), (cls, "reward"))}
GEMMA = ("gemma2", "gemma3")
_GEMMA_TRAITS = dict(norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True)
TRAITS = {"llama": {}, "mistral": {}, "phi3": {}, "qwen2": dict(qkv_bias=True),
          "qwen3": dict(qk_norm=True), "gemma2": _GEMMA_TRAITS,
          "gemma3": dict(_GEMMA_TRAITS, qk_norm=True), "qwen3_moe": dict(qk_norm=True),
          "mixtral": {}}
"""The ``ModelConfig`` switches each family fixes (the rest of ``_TRAIT_FIELDS`` are False)."""
_TRAIT_FIELDS = ("qkv_bias", "qk_norm", "norm_unit_offset", "sandwich_norms", "scale_embeddings")
UNIFORM_WINDOW = ("mistral", "phi3", "mixtral")
"""Families whose ``sliding_window`` applies to every layer (per-layer: Gemma only)."""
_HF_ACT = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_OUR_ACT = {v: k for k, v in _HF_ACT.items()}
_DEFAULT_HEAD_DIM = {"qwen3": 128, "gemma2": 256, "gemma3": 256}
_GEMMA_IDS = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
_DEFAULT_IDS = {"phi3": {"bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
                "gemma2": _GEMMA_IDS, "gemma3": _GEMMA_IDS,
                "mixtral": {"bos_token_id": 1, "eos_token_id": 2}}
"""transformers' class defaults for token ids a ``config.json`` leaves out (others: None)."""
_DEFAULT_THETA = {"gemma3": 1_000_000.0, "mixtral": 1_000_000.0}
_DEFAULT_EPS = {"phi3": 1e-5, "mixtral": 1e-5}
MOE = ("qwen3_moe", "mixtral")
_DEFAULT_MOE = {"qwen3_moe": dict(intermediate_size=6144, max_position_embeddings=32768,
                                  num_experts=128, num_experts_per_tok=8),
                "mixtral": dict(intermediate_size=14336, max_position_embeddings=131072,
                                num_experts=8, num_experts_per_tok=2)}
"""transformers' class defaults of the mixture-of-experts families (others: required keys)."""
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"config.json field {field!r} = {value!r} is not supported: {why}")


def _rope_of(params: dict, field: str, theta: float) -> tuple[float, RopeScaling | None]:
    """Base and scaling of one flat rope object (``rope_type`` default, linear or llama3)."""
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise unsupported(field, params, "expected one flat object")
    theta = float(params.get("rope_theta", theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported(f"{field}.partial_rotary_factor", params["partial_rotary_factor"],
                          "only full rotary embeddings")
    if kind in ("default", None):
        return theta, None
    if kind == "linear":
        if "factor" not in params:
            raise ValueError(f"config.json {field} (linear) lacks 'factor'")
        return theta, RopeScaling(rope_type="linear", factor=float(params["factor"]))
    if kind != "llama3":
        raise unsupported(f"{field}.rope_type", kind, "only 'default', 'linear' and 'llama3' "
                          "rope (Phi-3's 'longrope' is not implemented)")
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"config.json {field} (llama3) lacks {missing}")
    return theta, RopeScaling(rope_type="llama3", factor=float(params["factor"]),
                              low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(
                                  params["original_max_position_embeddings"]))


def _rope(hf: dict, family: str) -> tuple[float, RopeScaling | None, float | None]:
    """``(theta, scaling, local theta)`` from ``rope_parameters`` (transformers >= 5; Gemma 3
    nests one object per layer type) or top-level ``rope_theta``/``rope_scaling`` (and Gemma 3's
    ``rope_local_base_freq``) of earlier releases."""
    params = hf.get("rope_parameters")
    default = _DEFAULT_THETA.get(family, 10000.0)
    if family == "gemma3" and isinstance(params, dict) and set(params) & set(LAYER_TYPES):
        theta, scaling = _rope_of(params.get("full_attention") or {},
                                  "rope_parameters.full_attention", default)
        local, local_scaling = _rope_of(params.get("sliding_attention") or {},
                                        "rope_parameters.sliding_attention", 10000.0)
        if local_scaling is not None:
            raise unsupported("rope_parameters.sliding_attention.rope_type",
                              local_scaling.rope_type, "sliding layers use plain RoPE")
        return theta, scaling, local
    if isinstance(params, dict):
        theta, scaling = _rope_of(params, "rope_parameters", hf.get("rope_theta", default))
    else:
        theta, scaling = _rope_of(hf.get("rope_scaling") or {}, "rope_scaling",
                                  hf.get("rope_theta", default))
    if family == "phi3" and scaling is not None:
        raise unsupported("rope_parameters.rope_type", scaling.rope_type,
                          "Phi-3 with plain RoPE only (longrope is not implemented)")
    local = float(hf.get("rope_local_base_freq", 10000.0)) if family == "gemma3" else None
    return theta, scaling, local


def _layers(hf: dict, family: str, n: int) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)``, canonical: ``layer_types`` only when layers differ."""
    types = hf.get("layer_types")
    if family in UNIFORM_WINDOW:
        return hf.get("sliding_window"), None
    if family not in GEMMA:
        if hf.get("use_sliding_window"):
            raise unsupported("use_sliding_window", True, f"{family} per-layer sliding windows")
        if "sliding_attention" in (types or []):
            raise unsupported("layer_types", types, "sliding-attention layers")
        return None, None
    if types is None:  # transformers < 4.53: a period, the last layer of each being global
        period = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or set(types) - set(LAYER_TYPES):
        raise unsupported("layer_types", types, f"{n} entries from {LAYER_TYPES}")
    if "sliding_attention" not in types:
        return None, None
    window = hf.get("sliding_window", 4096)
    return window, None if set(types) == {"sliding_attention"} else tuple(types)


def _gemma_fields(hf: dict, family: str) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise unsupported("use_bidirectional_attention", True, "causal decoders only")
    attn_cap = hf.get("attn_logit_softcapping", 50.0 if family == "gemma2" else None)
    if family == "gemma3" and attn_cap is not None:
        raise unsupported("attn_logit_softcapping", attn_cap,
                          "transformers' Gemma 3 never applies it; set it to null")
    return dict(query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                attn_logit_softcap=attn_cap,
                final_logit_softcap=hf.get("final_logit_softcapping",
                                           30.0 if family == "gemma2" else None))


def _activation(hf: dict, family: str) -> str:
    key = "hidden_activation" if family in GEMMA and "hidden_activation" in hf else "hidden_act"
    value = hf.get(key, "gelu_pytorch_tanh" if family in GEMMA else "silu")
    if value not in _HF_ACT:
        raise unsupported(key, value, f"the gated MLP's activation must be one of "
                          f"{sorted(_HF_ACT)}")
    return _HF_ACT[value]


def _experts(hf: dict, family: str) -> dict:
    """The ``ModelConfig`` mixture-of-experts fields of a ``qwen3_moe``/``mixtral`` config."""
    counts = {hf[k] for k in ("num_experts", "num_local_experts") if hf.get(k) is not None}
    if len(counts) > 1:
        raise unsupported("num_experts/num_local_experts", sorted(counts), "they must agree")
    default = _DEFAULT_MOE[family]
    out = dict(num_experts=counts.pop() if counts else default["num_experts"],
               num_experts_per_tok=hf.get("num_experts_per_tok", default["num_experts_per_tok"]),
               router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    if family == "mixtral":
        if hf.get("router_jitter_noise"):
            raise unsupported("router_jitter_noise", hf["router_jitter_noise"],
                              "router noise is not modelled; set it to 0.0")
        return dict(out, moe_intermediate_size=hf.get("intermediate_size",
                                                      default["intermediate_size"]))
    return dict(out, moe_intermediate_size=hf.get("moe_intermediate_size", 768),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))


def _dtype_name(dtype, field: str) -> str:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise unsupported(field, dtype, f"dtype must be one of {DTYPES}")
    return name


def _family(hf: dict) -> tuple[str, str, str]:
    archs = hf.get("architectures")
    known = [a for a in archs or [] if a in ARCHITECTURES]
    if len(known) != 1:
        raise unsupported("architectures", archs, f"expected one of {sorted(ARCHITECTURES)}")
    family, stored_head = ARCHITECTURES[known[0]]
    model_type = FAMILY_HF[family][0]
    if hf.get("model_type", model_type) != model_type:
        raise unsupported("model_type", hf["model_type"], f"{known[0]} needs {model_type!r}")
    return family, stored_head, known[0]


def _check_biases(hf: dict, family: str) -> None:
    if hf.get("mlp_bias"):
        raise unsupported("mlp_bias", True, "MLP projections have no bias")
    if family != "qwen2" and hf.get("attention_bias"):
        raise unsupported("attention_bias", True, "o_proj has no bias (use a Qwen2 checkpoint "
                          "for q/k/v biases)")


def config_from_hf(hf: dict, *, dtype=None, heads: tuple[str, ...] | None = None,
                   has_value_head: bool = False) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``config.json`` dict (see ``models.hf``)."""
    family, stored_head, arch = _family(hf)
    _check_biases(hf, family)
    if stored_head == "reward":
        labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
        if labels != 1:
            raise unsupported("id2label/num_labels", labels, "a reward model has one label")
    if heads is None:  # canonical order, so an exported config reads back equal
        heads = tuple(h for h in HEADS if h == stored_head or (h == "value" and has_value_head))
    if not heads or len(set(heads)) != len(heads) or set(heads) - set(HEADS):
        raise ValueError(f"heads must be distinct names from {HEADS}, got {heads}")
    if "lm" in heads and stored_head != "lm":
        raise ValueError(f"heads={heads} asks for 'lm' but {arch} has no LM head")
    theta, scaling, local = _rope(hf, family)
    name = _dtype_name(dtype if dtype is not None else hf.get("dtype") or hf.get("torch_dtype")
                       or "float32", "dtype")
    num_heads, n = hf["num_attention_heads"], hf["num_hidden_layers"]
    window, layer_types = _layers(hf, family, n)
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"] if family not in MOE else hf.get(
            "intermediate_size", _DEFAULT_MOE[family]["intermediate_size"]),
        num_layers=n, num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim", _DEFAULT_HEAD_DIM.get(family)), rope_theta=theta,
        rope_scaling=scaling, rope_local_theta=local,
        rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_EPS.get(family, 1e-6))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family in GEMMA)),
        sliding_window=window, layer_types=layer_types, mlp_activation=_activation(hf, family),
        max_position_embeddings=hf.get("max_position_embeddings", _DEFAULT_MOE.get(
            family, {}).get("max_position_embeddings", 2048)),
        param_dtype=name, dtype=name, heads=tuple(heads),
        **{f: TRAITS[family].get(f, False) for f in _TRAIT_FIELDS},
        **(_gemma_fields(hf, family) if family in GEMMA else {}),
        **(_experts(hf, family) if family in MOE else {}))


def _check_exportable(c: ModelConfig) -> None:
    """Refuse a config with no Hugging Face equivalent, naming the field."""
    if "lm" in c.heads and "reward" in c.heads:
        raise ValueError("heads with both 'lm' and 'reward' have no Hugging Face architecture")
    if "lm" not in c.heads and "reward" not in c.heads:
        raise ValueError("export needs an 'lm' or a 'reward' head")
    for field in _TRAIT_FIELDS:
        want = TRAITS[c.family].get(field, False)
        if getattr(c, field) != want:
            raise ValueError(f"family={c.family!r} with {field}={getattr(c, field)} has no "
                             f"Hugging Face equivalent ({c.family} has {field}={want})")
    allowed = {"sliding_window": UNIFORM_WINDOW + GEMMA, "layer_types": GEMMA,
               "query_pre_attn_scalar": GEMMA, "attn_logit_softcap": ("gemma2",),
               "final_logit_softcap": GEMMA, "rope_local_theta": ("gemma3",)}
    for field, families in allowed.items():
        if getattr(c, field) is not None and c.family not in families:
            raise ValueError(f"{field} is exported for families {families} only, not "
                             f"{c.family!r}")
    if c.family == "phi3" and c.rope_scaling is not None:
        raise ValueError("family 'phi3' is exported with plain RoPE only (rope_scaling=None)")
    _check_experts_exportable(c)


def _check_experts_exportable(c: ModelConfig) -> None:
    if (c.family in MOE) != bool(c.num_experts):
        raise ValueError(f"family={c.family!r} with num_experts={c.num_experts} has no Hugging "
                         f"Face equivalent (experts are exported for families {MOE} only, and "
                         f"those need num_experts > 0)")
    if c.family != "mixtral":
        return
    want = dict(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
                intermediate_size=c.expert_size)
    for field, value in want.items():
        if getattr(c, field) != value:
            raise ValueError(f"family 'mixtral' needs {field}={value!r} (every layer sparse, "
                             f"renormalised, one MLP width), got {getattr(c, field)!r}")


def _rope_dict(theta: float, scaling: RopeScaling | None) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None and scaling.rope_type == "linear":
        rope.update(rope_type="linear", factor=scaling.factor)
    elif scaling is not None:
        rope.update(rope_type="llama3", **{k: getattr(scaling, k) for k in _LLAMA3_KEYS})
    return rope


def _rope_to_hf(c: ModelConfig) -> dict:
    """Both rope layouts (``rope_parameters`` and the legacy top-level keys), for old and new
    readers; Gemma 3 nests one object per layer type."""
    rope = _rope_dict(c.rope_theta, c.rope_scaling)
    legacy = None if c.rope_scaling is None else {k: v for k, v in rope.items()
                                                  if k != "rope_theta"}
    out = {"rope_parameters": rope, "rope_theta": c.rope_theta, "rope_scaling": legacy}
    if c.family == "gemma3":
        local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": _rope_dict(
            local, None)}, rope_local_base_freq=local)
    return out


def _family_to_hf(c: ModelConfig) -> dict:
    act = _OUR_ACT[c.mlp_activation]
    if c.family in GEMMA:
        sliding = c.layer_is_sliding()
        return {
            "hidden_activation": act, "head_dim": c.dim_per_head, "attention_bias": False,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            # transformers builds the sliding mask even with no sliding layer and needs a size
            "sliding_window": c.sliding_window or c.max_position_embeddings,
            "query_pre_attn_scalar": c.query_pre_attn_scalar or c.dim_per_head,
            "attn_logit_softcapping": c.attn_logit_softcap,
            "final_logit_softcapping": c.final_logit_softcap,
            "use_bidirectional_attention": False}
    hf = {"hidden_act": act, **_experts_to_hf(c)}
    if c.head_dim is not None or c.family in ("qwen3", "qwen3_moe"):
        hf["head_dim"] = c.dim_per_head
    if c.family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    if c.family == "qwen3_moe":
        hf.update(use_sliding_window=False, sliding_window=None, attention_bias=False)
    elif c.family not in ("qwen2", "mixtral"):
        hf.update(attention_bias=False, mlp_bias=False)
    if c.family in UNIFORM_WINDOW:
        hf["sliding_window"] = c.sliding_window
    return hf


def _experts_to_hf(c: ModelConfig) -> dict:
    if c.family not in MOE:
        return {}
    hf = {"num_experts_per_tok": c.num_experts_per_tok, "output_router_logits": False,
          "router_aux_loss_coef": c.router_aux_loss_coef}
    if c.family == "mixtral":  # the experts are ``intermediate_size`` wide
        return dict(hf, num_local_experts=c.num_experts, router_jitter_noise=0.0)
    return dict(hf, num_experts=c.num_experts, moe_intermediate_size=c.expert_size,
                norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=c.decoder_sparse_step,
                mlp_only_layers=list(c.mlp_only_layers))


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict for ``config``."""
    c = config
    _check_exportable(c)
    model_type, causal, classifier = FAMILY_HF[c.family]
    hf = {
        "architectures": [causal if "lm" in c.heads else classifier], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_embeddings, "dtype": c.param_dtype,
        "torch_dtype": c.param_dtype, "use_cache": True,
        **_rope_to_hf(c), **_family_to_hf(c),
    }
    if "lm" not in c.heads:
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    # Token ids are written by ``save_hf_checkpoint(generation_config=...)``; left out,
    # transformers would fill in its class default, which for a small vocabulary can be no
    # token at all (Phi-3's pad id 32000 then fails to build the embedding): write null instead.
    hf.update({k: None for k, v in _DEFAULT_IDS.get(c.family, {}).items() if v >= c.vocab_size})
    return hf
