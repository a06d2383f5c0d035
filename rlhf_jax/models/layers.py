"""The decoder's building blocks in Flax NNX: RMSNorm, linear layers, attention, gated MLPs and
the pre-norm block. ``transformer.py`` stacks them; ``ModelConfig`` switches pick each family's
variant (see ``models.config``), so one block serves every family.

References: Llama (Touvron et al., 2023; HF ``modeling_llama.py``), Qwen3 (HF
``modeling_qwen3.py``: q/k norm), Gemma 2 (Gemma Team, 2024; HF ``modeling_gemma2.py``: soft-caps,
sandwich norms, ``(1 + w)`` RMSNorm), Gemma 3 (HF ``modeling_gemma3.py``), Phi-3 (HF
``modeling_phi3.py``: Llama's maths with fused projections in the checkpoint), Qwen3-MoE and
Mixtral (HF ``modeling_qwen3_moe.py``, ``modeling_mixtral.py``: ``models.moe.MoEMLP`` in place of
the MLP of the sparse layers).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.moe import MoEMLP
from rlhf_jax.models.rope import apply_rope
from rlhf_jax.ops.logprobs import NEG_INF


def _dtype(name: str):
    return jnp.dtype(name)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's tanh soft-cap ``cap * tanh(x / cap)`` (identity for ``cap=None``): smooth,
    odd, slope 1 at 0, bounded by ``cap``."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich, 2019) with its statistics in float32.

    Llama/Qwen/Phi (``unit_offset=False``): ``y = (x / sqrt(mean(x^2) + eps)).astype(x) * w``.
    Gemma (``unit_offset=True``): ``y = (x / sqrt(mean(x^2) + eps) * (1 + w)).astype(x)``, the
    multiply in float32 too (HF ``Gemma2RMSNorm``), with ``w`` starting at 0.
    """

    def __init__(self, dim: int, eps: float, param_dtype, unit_offset: bool = False):
        init = jnp.zeros if unit_offset else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype))
        self.eps, self.unit_offset = eps, unit_offset

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


class FlatLinear(nnx.Linear):
    """``nnx.Linear`` on the ``[N, D]`` flattening of its ``[..., D]`` input. Same parameters
    and numbers; XLA:CPU runs the backward's 2-D matmuls ~15% faster than the batched ones
    (``benchmarks/README.md``), at no cost elsewhere (the reshapes are free bitcasts)."""

    def __call__(self, x, **kwargs):
        lead = x.shape[:-1]
        return super().__call__(x.reshape(-1, x.shape[-1]), **kwargs).reshape(*lead, -1)


def linear(cfg: ModelConfig, d_in: int, d_out: int, rngs, bias: bool = False) -> nnx.Linear:
    return FlatLinear(d_in, d_out, use_bias=bias, dtype=_dtype(cfg.dtype),
                   param_dtype=_dtype(cfg.param_dtype),
                   kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def _norm(cfg: ModelConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, _dtype(cfg.param_dtype), cfg.norm_unit_offset)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, scores and softmax in float32.

    ``scores = softcap(q . k * scale, attn_logit_softcap)`` masked by ``allowed``, with
    ``scale = query_pre_attn_scalar ** -0.5`` (default ``head_dim ** -0.5``). With ``qk_norm``
    each head's q and k go through their own RMSNorm before RoPE (Qwen3, Gemma 3).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, k = cfg.hidden_size, cfg.dim_per_head
        self.q_proj = linear(cfg, d, cfg.num_heads * k, rngs, cfg.qkv_bias)
        self.k_proj = linear(cfg, d, cfg.num_kv_heads * k, rngs, cfg.qkv_bias)
        self.v_proj = linear(cfg, d, cfg.num_kv_heads * k, rngs, cfg.qkv_bias)
        self.o_proj = linear(cfg, cfg.num_heads * k, d, rngs)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = _norm(cfg, k), _norm(cfg, k)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, k
        self.scale = float(cfg.query_pre_attn_scalar or k) ** -0.5
        self.logit_cap = cfg.attn_logit_softcap

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], inv_freq,
                 allowed: Bool[Array, "B T S"], kv=None, index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        keys = "bshk"  # the layout of k and v: [B, S, Hkv, K] without a cache
        if kv is not None:  # write this call's keys/values into the layer's cache slots
            k, v = (jax.lax.dynamic_update_slice(
                cached, new.astype(cached.dtype).transpose(0, 2, 1, 3), (0, 0, index, 0))
                for cached, new in zip(kv, (k, v)))  # the layer's cache is [B, Hkv, S, K]
            kv, keys = (k, v), "bhsk"
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)  # [B, T, Hkv, G, K]
        scores = jnp.einsum(f"bthgk,{keys}->bhgts", q, k, preferred_element_type=jnp.float32)
        scores = softcap(scores.astype(jnp.float32) * self.scale, self.logit_cap)
        scores = jnp.where(allowed[:, None, None], scores, NEG_INF)  # [B, Hkv, G, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum(f"bhgts,{keys}->bthgk", probs, v).reshape(b, t, -1)
        return self.o_proj(out), kv


ACTIVATION_FNS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
"""``ModelConfig.mlp_activation`` -> function. ``gelu_tanh`` is
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, torch's ``gelu(approximate="tanh")``."""


class GatedMLP(nnx.Module):
    """SwiGLU / GeGLU (Shazeer, 2020): ``down(act(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.up_proj = linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.down_proj = linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)
        self.act = cfg.mlp_activation

    def __call__(self, x):
        return self.down_proj(ACTIVATION_FNS[self.act](self.gate_proj(x)) * self.up_proj(x))


def moe_mlp(cfg: ModelConfig, rngs: nnx.Rngs) -> MoEMLP:
    """The config's mixture of experts (``models.moe.MoEMLP``): ``[B, T, D] -> ([B, T, D],
    router logits [B*T, E])``."""
    return MoEMLP(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.expert_size,
                  num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                  norm_topk_prob=cfg.norm_topk_prob, dtype=_dtype(cfg.dtype),
                  param_dtype=_dtype(cfg.param_dtype), rngs=rngs)


MLPS: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {"dense": GatedMLP,
                                                                  "moe": moe_mlp}
"""``ModelConfig.mlp_kinds()`` entry -> the block's feed-forward module, taking ``(cfg, rngs)``.
``dense`` maps ``[B, T, D] -> [B, T, D]``; ``moe`` also returns its router logits."""


class Block(nnx.Module):
    """Pre-norm decoder block: ``x += attn(norm(x)); x += mlp(norm(x))``.

    With ``sandwich_norms`` (Gemma 2/3) each sub-layer's output is normalised too before the
    residual add: ``x += attn_out_norm(attn(input_norm(x)))``, then
    ``x += mlp_out_norm(mlp(post_attn_norm(x)))``. ``post_attn_norm`` always normalises the MLP
    input (HF ``post_attention_layernorm`` for Llama-like families, ``pre_feedforward_layernorm``
    for Gemma); ``attn_out_norm``/``mlp_out_norm`` are Gemma's ``post_attention_layernorm`` /
    ``post_feedforward_layernorm``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mlp_kind: str = "dense"):
        self.input_norm = _norm(cfg, cfg.hidden_size)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = _norm(cfg, cfg.hidden_size)
        self.mlp = MLPS[mlp_kind](cfg, rngs)
        self.sparse = mlp_kind == "moe"
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.attn_out_norm = _norm(cfg, cfg.hidden_size)
            self.mlp_out_norm = _norm(cfg, cfg.hidden_size)

    def __call__(self, x, positions, inv_freq, allowed, kv=None, index=None):
        """``(x, kv, router_logits)``; the logits ``[B*T, E]`` (float32) of a mixture-of-experts
        layer, None for a dense one. With a cache, ``kv`` is this layer's ``(k, v)`` cache
        (``[B, Hkv, S, K]`` each) and ``index`` the first slot to write; the returned ``kv``
        has this call's keys and values written at ``[:, :, index:]``."""
        h, kv = self.attn(self.input_norm(x), positions, inv_freq, allowed, kv, index)
        x = x + (self.attn_out_norm(h) if self.sandwich else h)
        h, router_logits = self.mlp(self.post_attn_norm(x)), None
        if self.sparse:
            h, router_logits = h
        return x + (self.mlp_out_norm(h) if self.sandwich else h), kv, router_logits
