"""Decoder-only transformer (Llama, Qwen2/3, Mistral, Phi-3, Gemma 2/3, Qwen3-MoE, Mixtral) in
Flax NNX, exposed as pure functions.

The training code never holds a Flax module: ``init_model`` returns a ``Model`` (config plus the
NNX graph definition, both static) and a params pytree (a nested dict of arrays), and every
method of ``Model`` is a pure function of ``params``. A frozen reference model is just another
params pytree passed to the same ``Model``.

Attention is computed in float32 with a boolean mask built once per call from slot indices:
causal (key slot <= query slot), key validity (padding and, with a cache, unwritten slots), equal
segment ids (packed sequences) and, for the sliding layers, the window: one full and one sliding
mask, and one RoPE table per layer kind (Gemma 3's local base), each layer picking its pair by
``ModelConfig.layer_is_sliding()``, so per-layer attributes are data and one program is compiled
per shape. The blocks live in ``models.layers``. The KV cache is a pytree (``KVCache``) of one
``[B, Hkv, S, K]`` buffer per layer: each layer writes its slots with one
``dynamic_update_slice`` and its attention matmuls read the buffer as it lies, so a jitted decode
step neither copies nor transposes the cache. (Slicing each layer out of stacked arrays and
stacking them again copied the whole cache every step; writing in place decodes 1.65x the
tokens/s at the 135M-class shape, and the per-layer ``[B, Hkv, S, K]`` buffers drop the copy of
each layer's slice and its transposed copy for the matmuls, ``benchmarks/rollout.py``.)

Mixture-of-experts layers (``ModelConfig.mlp_kinds()``, a static per-layer choice) route each
token on its own, so prefill, a decode step and a training forward route alike. Their router
logits come back in ``ModelOutput.router_logits`` (``[L_moe, B*T, E]``, float32) on every call:
unused, XLA drops them; the training loss adds ``moe_aux_loss(model, output, attention_mask)``
(Switch Transformer load balancing, HF ``load_balancing_loss_func`` in ``modeling_mixtral.py``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Block, RMSNorm, linear, softcap
from rlhf_jax.models.moe import load_balancing_loss, route
from rlhf_jax.models.rope import inverse_frequencies
from rlhf_jax.ops.masks import last_token_index


class KVCache(NamedTuple):
    """Preallocated keys and values, one ``[B, Hkv, S, K]`` array per layer; slot validity
    ``[B, S]``; the next slot.

    One buffer per layer, heads before slots: each layer writes its new slots in place and its
    attention matmuls read the buffer as it lies (batch dimensions first, the contracted one
    last), so a decode step copies none of the cache (``models.layers.Attention``)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array


class ModelOutput(NamedTuple):
    """Final hidden states; the updated cache (with one); the router logits of the
    mixture-of-experts layers in layer order, ``[L_moe, B*T, E]`` float32 (None for a dense
    model), rows in ``tokens.reshape(-1)`` order."""

    hidden: Float[Array, "B T D"]
    cache: KVCache | None
    router_logits: Float[Array, "Lm N E"] | None = None


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=pd, embedding_init=nnx.initializers.normal(0.02),
                               rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs, kind) for kind in cfg.mlp_kinds()])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cfg.norm_unit_offset)
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs)
        if "value" in cfg.heads:
            self.value_head = linear(cfg, cfg.hidden_size, 1, rngs, bias=True)
        if "reward" in cfg.heads:
            self.reward_head = linear(cfg, cfg.hidden_size, 1, rngs)
        self.cfg = cfg

    def __call__(self, tokens, positions, allowed: tuple, cache: KVCache | None):
        """``(hidden, cache, router_logits)``; ``allowed``: the ``(full, sliding)`` masks
        ``[B, T, S]`` (None for an unused kind)."""
        cfg = self.cfg
        inv_freq = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        # Gemma 3: the sliding layers use plain RoPE with their own base.
        local = (inv_freq if cfg.rope_local_theta is None else
                 inverse_frequencies(cfg.dim_per_head, cfg.rope_local_theta, None))
        x = self.embed(tokens)
        if cfg.scale_embeddings:  # HF Gemma: the normaliser is cast to the activations' dtype
            x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
        routers = []
        ks, vs = [], []  # each layer's cache, updated in place
        for i, (layer, sliding) in enumerate(zip(self.layers, cfg.layer_is_sliding())):
            freq, mask = (local if sliding else inv_freq), allowed[sliding]
            if cfg.remat and cache is None:
                x, _, logits = nnx.remat(lambda m, *a: m(*a))(layer, x, positions, freq, mask)
            elif cache is None:
                x, _, logits = layer(x, positions, freq, mask)
            else:
                x, (k, v), logits = layer(x, positions, freq, mask, (cache.k[i], cache.v[i]),
                                          cache.index)
                ks.append(k), vs.append(v)
            if logits is not None:
                routers.append(logits)
        x = self.norm(x)
        routers = jnp.stack(routers) if routers else None  # [L_moe, B*T, E]
        if cache is None:
            return x, None, routers
        return x, KVCache(tuple(ks), tuple(vs), cache.valid, cache.index), routers


def _masks(config: ModelConfig, q_slots, k_slots, k_valid, q_seg, k_seg) -> tuple:
    """``(full, sliding)`` attention masks, each built only when some layer uses it."""
    kinds = set(config.layer_is_sliding())
    full = _allowed(q_slots, k_slots, k_valid, q_seg, k_seg, None) if False in kinds else None
    sliding = (_allowed(q_slots, k_slots, k_valid, q_seg, k_seg, config.sliding_window)
               if True in kinds else None)
    return full, sliding


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
        """Final hidden states (after the last norm), with ``cache`` the updated cache, and the
        router logits of the mixture-of-experts layers (``ModelOutput``).

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
            allowed = _masks(self.config, jnp.broadcast_to(slots, (b, t)), slots, mask,
                             segment_ids, segment_ids)
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
            allowed = _masks(self.config, jnp.broadcast_to(q_slots, (b, t)), jnp.arange(s),
                             valid, None, None)
        hidden, new_cache, router_logits = self._module(params)(tokens, positions, allowed, cache)
        if new_cache is not None:
            new_cache = new_cache._replace(index=cache.index + t)
        return ModelOutput(hidden, new_cache, router_logits)

    def unembedding(self, params) -> Float[Array, "D V"]:
        """The LM head as a ``[D, V]`` matrix (the transposed embedding when tied); the logits
        are ``softcap(hidden @ unembedding, config.final_logit_softcap)``."""
        if "lm" not in self.config.heads:
            raise ValueError("this model has no 'lm' head")
        if self.config.tie_embeddings:
            return params["embed"]["embedding"].T
        return params["lm_head"]["kernel"]

    def logits(self, params, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Next-token logits in float32 (matmul accumulated in float32), soft-capped as
        ``cap * tanh(z / cap)`` when ``config.final_logit_softcap`` is set (Gemma 2).

        Code that computes logits from ``unembedding`` itself (the chunked log-probs) must pass
        ``softcap=config.final_logit_softcap`` too (``models.scoring`` does).
        """
        w = self.unembedding(params)
        z = jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype),
                       preferred_element_type=jnp.float32).astype(jnp.float32)
        return softcap(z, self.config.final_logit_softcap)

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
        shape = (batch, c.num_kv_heads, length, c.dim_per_head)
        k, v = ([jnp.zeros(shape, jnp.dtype(c.dtype)) for _ in range(c.num_layers)]
                for _ in "kv")
        return KVCache(tuple(k), tuple(v), jnp.zeros((batch, length), bool),
                       jnp.zeros((), jnp.int32))


def moe_aux_loss(model: Model, output: ModelOutput, attention_mask: Bool[Array, "B T"] | None
                 ) -> Float[Array, ""]:
    """``router_aux_loss_coef * load_balancing_loss``: the mixture-of-experts auxiliary loss of
    one forward pass, over every MoE layer's tokens pooled (``models.moe.load_balancing_loss``;
    HF ``MixtralForCausalLM.forward`` / ``Qwen3MoeForCausalLM.forward`` add the same term with
    ``load_balancing_loss_func``). Padding (``attention_mask`` 0) counts for nothing; 0.0 for a
    dense model.

    A mean over tokens already: add it to a mean loss, or ``aux * count`` to a ``(sum, count)``
    loss sum. Its gradient reaches the routers only (the top-k counts are constants).
    """
    c = model.config
    if output.router_logits is None:
        return jnp.zeros((), jnp.float32)
    logits = output.router_logits  # [L_moe, N, E]
    _, experts = route(logits.reshape(-1, logits.shape[-1]), top_k=c.num_experts_per_tok,
                       norm_topk_prob=c.norm_topk_prob)
    mask = None if attention_mask is None else attention_mask.reshape(-1)  # [N], N = B*T
    aux = load_balancing_loss(logits, experts.reshape(*logits.shape[:-1], -1), mask,
                              num_experts=c.num_experts, top_k=c.num_experts_per_tok)
    return c.router_aux_loss_coef * aux


def remat_compiler_options(platform: str | None = None) -> dict[str, str]:
    """XLA compiler options for a program that differentiates a ``remat`` model:
    ``jax.jit(step, compiler_options=remat_compiler_options())`` (the trainer's steps do).

    ``jax.checkpoint`` feeds each recomputed block through an ``optimization_barrier`` so that
    common-subexpression elimination cannot merge the backward's recomputation with the forward
    pass. XLA:CPU expands those barriers away (its ``cse_barrier_expander`` pass) before it runs
    CSE, which then merges them: every block's activations stay alive until the backward and
    remat saves nothing. Measured on the 135M-class shape (8 rows x 128 tokens, gradient of the
    log-probs): temporaries 403 MiB with 4 layers and 645 MiB with 8 without the option, 192 MiB
    for both with it. Gradients are unchanged. ``platform``: default ``jax.default_backend()``;
    on other platforms (whose compilers keep the barriers) no options are needed.
    """
    platform = jax.default_backend() if platform is None else platform
    return {"xla_disable_hlo_passes": "cse_barrier_expander"} if platform == "cpu" else {}


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
