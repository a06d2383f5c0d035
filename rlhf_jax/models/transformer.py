"""Decoder-only transformer (Llama / Qwen2 / Mistral) in Flax NNX, exposed as pure functions.

The training code never holds a Flax module: ``init_model`` returns a ``Model`` (config plus the
NNX graph definition, both static) and a params pytree (a nested dict of arrays), and every
method of ``Model`` is a pure function of ``params``. A frozen reference model is just another
params pytree passed to the same ``Model``.

Attention is computed in float32 with a boolean mask built once per call from slot indices:
causal (key slot <= query slot), key validity (padding and, with a cache, unwritten slots), equal
segment ids (packed sequences) and Mistral's sliding window. The KV cache is a pytree
(``KVCache``) updated with ``dynamic_update_slice`` so a jitted decode step with donated buffers
updates it in place.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.rope import apply_rope, inverse_frequencies
from rlhf_jax.ops.logprobs import NEG_INF
from rlhf_jax.ops.masks import last_token_index


class KVCache(NamedTuple):
    """Preallocated keys/values ``[L, B, S, Hkv, K]``, slot validity ``[B, S]``, next slot."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


class ModelOutput(NamedTuple):
    hidden: Float[Array, "B T D"]
    cache: KVCache | None


def _dtype(name: str):
    return jnp.dtype(name)


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` with the statistics in float32."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


class _Linear(nnx.Linear):
    """``nnx.Linear`` on the ``[N, D]`` flattening of its ``[..., D]`` input. Same parameters
    and numbers; XLA:CPU runs the backward's 2-D matmuls ~15% faster than the batched ones
    (``benchmarks/README.md``), at no cost elsewhere (the reshapes are free bitcasts)."""

    def __call__(self, x, **kwargs):
        lead = x.shape[:-1]
        return super().__call__(x.reshape(-1, x.shape[-1]), **kwargs).reshape(*lead, -1)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, rngs, bias: bool = False) -> nnx.Linear:
    return _Linear(d_in, d_out, use_bias=bias, dtype=_dtype(cfg.dtype),
                      param_dtype=_dtype(cfg.param_dtype),
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, k = cfg.hidden_size, cfg.dim_per_head
        self.q_proj = _linear(cfg, d, cfg.num_heads * k, rngs, cfg.qkv_bias)
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * k, rngs, cfg.qkv_bias)
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * k, rngs, cfg.qkv_bias)
        self.o_proj = _linear(cfg, cfg.num_heads * k, d, rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, k

    def __call__(self, x, positions, inv_freq, allowed, kv=None, index=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:  # write this call's keys/values into the cache, attend over all slots
            k_all, v_all = kv
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, index, 0, 0))
            kv, k, v = (k_all, v_all), k_all, v_all
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)  # [B, T, Hkv, G, K]
        scores = jnp.einsum("bthgk,bshk->bhgts", q, k, preferred_element_type=jnp.float32)
        scores = scores.astype(jnp.float32) * (self.head_dim**-0.5)
        scores = jnp.where(allowed[:, None, None], scores, NEG_INF)  # [B, Hkv, G, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhgts,bshk->bthgk", probs, v).reshape(b, t, -1)
        return self.o_proj(out), kv


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, inv_freq, allowed, kv=None, index=None):
        h, kv = self.attn(self.input_norm(x), positions, inv_freq, allowed, kv, index)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=_dtype(cfg.dtype),
                               param_dtype=pd, embedding_init=nnx.initializers.normal(0.02),
                               rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs)
        if "value" in cfg.heads:
            self.value_head = _linear(cfg, cfg.hidden_size, 1, rngs, bias=True)
        if "reward" in cfg.heads:
            self.reward_head = _linear(cfg, cfg.hidden_size, 1, rngs)
        self.cfg = cfg

    def __call__(self, tokens, positions, allowed, cache: KVCache | None):
        cfg = self.cfg
        inv_freq = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        x = self.embed(tokens)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            index = None if cache is None else cache.index
            if cfg.remat and cache is None:
                x, kv = nnx.remat(lambda m, *a: m(*a))(layer, x, positions, inv_freq, allowed)
            else:
                x, kv = layer(x, positions, inv_freq, allowed, kv, index)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = self.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(jnp.stack(new_k), jnp.stack(new_v), cache.valid, cache.index)


def _allowed(q_slots, k_slots, k_valid, q_seg, k_seg, window) -> Bool[Array, "B T S"]:
    allowed = (k_slots[None, None, :] <= q_slots[:, :, None]) & k_valid[:, None, :]
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    if window is not None:
        allowed &= (q_slots[:, :, None] - k_slots[None, None, :]) < window
    return allowed


@dataclasses.dataclass(frozen=True)
class Model:
    """Pure functions of ``params`` for one ``ModelConfig`` (hashable, safe to close over)."""

    config: ModelConfig
    graphdef: nnx.GraphDef

    def _module(self, params) -> Transformer:
        return nnx.merge(self.graphdef, params)

    def apply(
        self,
        params,
        tokens: Int[Array, "B T"],
        *,
        attention_mask: Bool[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        """Final hidden states (after the last norm) and, with ``cache``, the updated cache.

        Args:
          tokens: ``[B, T]`` ids.
          attention_mask: ``[B, T]``, 1 for real tokens (left or right padding); default all 1.
          positions: ``[B, T]`` rotary positions; default ``cumsum(mask) - 1`` per row (so left
            padding gets correct positions), or the running position with a cache.
          segment_ids: ``[B, T]`` packed-sequence ids; tokens attend within their segment only.
            Give ``positions`` that restart at 0 for each segment.
          cache: from ``init_cache``; the ``T`` new tokens are written at ``cache.index``.
        """
        b, t = tokens.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            slots = jnp.arange(t)
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
            allowed = _allowed(jnp.broadcast_to(slots, (b, t)), slots, mask, segment_ids,
                               segment_ids, self.config.sliding_window)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) is for training; not with a KV cache")
            s = cache.valid.shape[1]
            q_slots = cache.index + jnp.arange(t)
            valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
            cache = cache._replace(valid=valid)
            if positions is None:  # real tokens already in the cache, plus this call's
                before = jnp.sum(cache.valid & (jnp.arange(s) < cache.index), axis=-1)
                positions = before[:, None] + jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
            allowed = _allowed(jnp.broadcast_to(q_slots, (b, t)), jnp.arange(s), valid, None,
                               None, self.config.sliding_window)
        hidden, new_cache = self._module(params)(tokens, positions, allowed, cache)
        if new_cache is not None:
            new_cache = new_cache._replace(index=cache.index + t)
        return ModelOutput(hidden, new_cache)

    def unembedding(self, params) -> Float[Array, "D V"]:
        """The LM head as a ``[D, V]`` matrix (the transposed embedding when tied)."""
        if "lm" not in self.config.heads:
            raise ValueError("this model has no 'lm' head")
        if self.config.tie_embeddings:
            return params["embed"]["embedding"].T
        return params["lm_head"]["kernel"]

    def logits(self, params, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Next-token logits in float32 (matmul accumulated in float32)."""
        w = self.unembedding(params)
        return jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype),
                          preferred_element_type=jnp.float32).astype(jnp.float32)

    def values(self, params, hidden: Float[Array, "B T D"]) -> Float[Array, "B T"]:
        """Per-token value estimates from the value head, float32."""
        head = params["value_head"]
        v = hidden.astype(jnp.float32) @ head["kernel"].astype(jnp.float32)
        return (v + head["bias"].astype(jnp.float32))[..., 0]

    def rewards(self, params, hidden: Float[Array, "B T D"], mask: Bool[Array, "B T"]
                ) -> Float[Array, " B"]:
        """Scalar reward read at each row's last real token (``ops.last_token_index``)."""
        last = last_token_index(mask)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        return (h.astype(jnp.float32) @ params["reward_head"]["kernel"].astype(jnp.float32))[:, 0]

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of ``length`` slots (prompt plus completion)."""
        c = self.config
        if length > c.max_position_embeddings:
            raise ValueError(f"cache length {length} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.dim_per_head)
        z = jnp.zeros(shape, _dtype(c.dtype))
        return KVCache(z, z, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def init_model(config: ModelConfig, key: jax.Array) -> tuple[Model, dict]:
    """Build a model: its pure-function wrapper and freshly initialised params."""
    module = Transformer(config, rngs=nnx.Rngs(params=key))
    graphdef, state = nnx.split(module)
    return Model(config, graphdef), nnx.to_pure_dict(state)


def model_for(config: ModelConfig) -> Model:
    """The pure-function wrapper for ``config`` without allocating parameters (for loaded
    checkpoints, whose params come from disk)."""
    module = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=0)))
    return Model(config, nnx.split(module)[0])


def abstract_params(config: ModelConfig) -> dict:
    """Shapes and dtypes of the params (``jax.ShapeDtypeStruct`` leaves), allocating nothing."""
    return jax.eval_shape(lambda k: init_model(config, k)[1], jax.random.PRNGKey(0))
