"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): router math, grouped SwiGLU experts, aux loss.

Axis letters (besides ``types``): ``N`` tokens (``B*T`` flattened), ``E`` experts, ``k`` experts
per token (``top_k``), ``F`` one expert's hidden size (``moe_intermediate_size``).

A layer is ``route`` (float32 softmax, top-k, optional renormalisation) then ``expert_mlp``: the
``N*k`` (token, expert) assignments are sorted by expert and each expert's contiguous rows run
through its SwiGLU with ``jax.lax.ragged_dot`` (a grouped matmul), so no ``[N, E, D]`` or
``[N, E, F]`` tensor is built (the dense "every token through every expert" form costs E/k
times the FLOPs). Design choices:

* Static shapes: always ``N*k`` rows; group sizes come from ``bincount(length=E)``.
* Only permutations move rows (a repeat, a permutation gather, its inverse, a reshape-sum over
  ``k``), never a ``segment_sum`` over duplicate indices: the combine and its gradients are
  deterministic (no float atomics on GPU), so same-seed runs stay bitwise equal.
* Matmuls accumulate in float32 (``preferred_element_type``); the combine is float32.
* Lowering: on TPU and GPU ``ragged_dot`` is one ``chlo.ragged_dot`` (on GPU set
  ``jax_ragged_dot_use_gpu_pallas_triton_lowering`` for the Pallas grouped-GEMM kernel).
  JAX's CPU lowering densifies it (``[E, N*k, D]`` mask-and-dot): CPU is for tests only.

Hugging Face weights. Transformers 5.24 holds experts fused in memory but ``save_pretrained``
writes (and the Hub holds) one tensor per expert (``conversion_mapping.py``, reverted on save):

=====================  ===================================  ===================================
ours (``MoEMLP``)      Qwen3-MoE ``model.layers.{i}.mlp.``  Mixtral ``model.layers.{i}.
                                                            block_sparse_moe.`` (5.x: ``mlp.``)
=====================  ===================================  ===================================
router/kernel [D, E]   ``gate.weight`` [E, D] (transposed)  ``gate.weight`` [E, D] (transposed)
gate_proj [E, D, F]    ``experts.{e}.gate_proj.weight``     ``experts.{e}.w1.weight`` [F, D]
                       [F, D], stacked over e, transposed
up_proj [E, D, F]      ``experts.{e}.up_proj.weight``       ``experts.{e}.w3.weight`` [F, D]
down_proj [E, F, D]    ``experts.{e}.down_proj.weight``     ``experts.{e}.w2.weight`` [D, F]
                       [D, F]
fused (5.x in memory)  ``experts.gate_up_proj`` [E, 2F, D] = gate rows then up rows;
                       ``experts.down_proj`` [E, D, F]
=====================  ===================================  ===================================

Neither router has a bias (``F.linear(x, self.weight)``). HF dtypes: the router logits are
the model dtype (ours: float32-accumulated, so in bfloat16 near-ties may route differently);
both softmax in float32;
Qwen3-MoE casts the top-k weights back to the model dtype before the combine, Mixtral keeps them
float32; both add the experts' outputs in the model dtype. Here the combine is float32 and the
result is cast once (identical in float32). Not modelled: Mixtral's ``router_jitter_noise``
(training-only, default 0); Qwen3-MoE's dense layers (``mlp_only_layers``,
``decoder_sparse_step``) are the decoder's choice of ``MLP`` vs ``MoEMLP`` per layer.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from rlhf_jax.types import Mask

# family -> names of one expert's (gate, up, down) Linear layers in the Hub checkpoints.
HF_EXPERT_NAMES: dict[str, tuple[str, str, str]] = {
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}


def route(router_logits: Float[Array, "N E"], *, top_k: int, norm_topk_prob: bool
          ) -> tuple[Float[Array, "N k"], Int[Array, "N k"]]:
    """Top-k routing: ``p = softmax(logits)`` over all ``E`` experts in float32, keep the ``k``
    largest, and with ``norm_topk_prob`` renormalise them, ``w_j = p_j / sum_{i in top-k} p_i``.

    Mixtral always renormalises (``MixtralTopKRouter``), which equals a softmax over the top-k
    logits (Mixtral paper, Jiang et al. 2024, eq. 1: ``Softmax(TopK(x W_g))``); Qwen3-MoE follows
    ``config.norm_topk_prob`` (``Qwen3MoeTopKRouter``). Shazeer et al. 2017 for top-k gating.

    Returns ``(weights [N, k] float32, experts [N, k] int32)``, in descending weight order.

    >>> w, e = route(jnp.log(jnp.array([[1., 2., 5.]])), top_k=2, norm_topk_prob=True)
    >>> e.tolist(), [round(float(v), 4) for v in w[0]]
    ([[2, 1]], [0.7143, 0.2857])
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [N, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # [N, k]
    if norm_topk_prob:  # the k kept probabilities sum to >= k/E > 0
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_mlp(
    x: Float[Array, "N D"],
    weights: Float[Array, "N k"],
    experts: Int[Array, "N k"],
    w_gate: Float[Array, "E D F"],
    w_up: Float[Array, "E D F"],
    w_down: Float[Array, "E F D"],
) -> Float[Array, "N D"]:
    """``out_n = sum_j weights[n, j] * FFN_{experts[n, j]}(x_n)`` with the SwiGLU expert
    ``FFN_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]`` (Shazeer 2020, GLU variants).

    Grouped, not dense: the ``N*k`` assignments are sorted by expert (stable), their rows
    gathered, and ``jax.lax.ragged_dot`` multiplies each expert's contiguous block by that
    expert's weights (group sizes from ``bincount``). Matmuls accumulate in float32; the
    activation is cast to ``x.dtype`` before the down projection; the result has ``x.dtype``.
    ``experts`` must lie in ``[0, E)``.
    """
    n, d = x.shape
    k = experts.shape[-1]
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)  # [N*k]: row n*k + j is token n's j-th expert
    order = jnp.argsort(flat, stable=True)  # [N*k] rows grouped by expert
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype),
                                                  unique_indices=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    xs = jnp.repeat(x, k, axis=0).at[order].get(unique_indices=True)  # [N*k, D] sorted

    def grouped(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes,
                                  preferred_element_type=jnp.float32)

    h = jax.nn.silu(grouped(xs, w_gate)) * grouped(xs, w_up)  # [N*k, F] float32
    ys = grouped(h.astype(x.dtype), w_down)  # [N*k, D] float32
    y = ys.at[inverse].get(unique_indices=True).reshape(n, k, d)  # back to token order
    out = jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32))
    return out.astype(x.dtype)


def load_balancing_loss(router_logits: Float[Array, "*L N E"], experts: Int[Array, "*L N k"],
                        mask: Mask | None = None, *, num_experts: int, top_k: int
                        ) -> Float[Array, ""]:
    """Switch-Transformer auxiliary loss, as ``transformers``' ``load_balancing_loss_func``:

        aux = E * sum_e f_e * P_e,
        f_e = (1/R) sum_{rows r} m_r * #{j : experts[r, j] = e}   (top-k assignments per row)
        P_e = (1/R) sum_{rows r} m_r * softmax(logits_r)_e         (mean router probability)

    with ``R = sum_r m_r``; rows range over every layer's tokens (pass the layers stacked,
    ``[L, N, E]``: HF pools f and P over layers before the product, it does not average per-layer
    losses). ``sum_e f_e = k``, so perfectly balanced routing (f_e = k/E, P_e = 1/E) gives
    ``aux = k``. Fedus et al. 2021 (Switch Transformer), eqs. 4-6, with top-k counts; the
    same ``load_balancing_loss_func`` serves transformers' Mixtral (Jiang et al. 2024) and
    Qwen3-MoE (``router_aux_loss_coef`` defaults to 0.001 in both). HF takes the softmax in the
    logits' dtype; here it is float32.

    Args:
      router_logits: ``[*L, N, E]`` (any dtype; softmax in float32).
      experts: ``[*L, N, k]`` from ``route`` (same rows); ``f`` has no gradient.
      mask: ``[N]`` (or ``[*L, N]``), 1 for tokens that count (``attention_mask`` flattened);
        ``None`` counts all. An all-zero mask gives 0 (finite gradient).

    Returns a float32 scalar, already a mean over tokens: add ``router_aux_loss_coef * aux`` to a
    mean loss, or ``router_aux_loss_coef * aux * count`` to a ``(sum, count)`` loss sum. It is a
    product of means, so micro-batches each get their own (as in HF).
    """
    if experts.shape[-1] != top_k:
        raise ValueError(f"experts has {experts.shape[-1]} per token, top_k is {top_k}")
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [*L, N, E]
    counts = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=-2)  # [*L,N,E]
    m = jnp.ones(probs.shape[:-1], jnp.float32) if mask is None else jnp.broadcast_to(
        jnp.asarray(mask).astype(jnp.float32), probs.shape[:-1])  # [*L, N]
    rows = jnp.maximum(jnp.sum(m), 1.0)
    axes = tuple(range(probs.ndim - 1))
    f = jnp.sum(counts * m[..., None], axis=axes) / rows  # [E]
    p = jnp.sum(probs * m[..., None], axis=axes) / rows  # [E]
    return num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


class _Router(nnx.Module):
    """Holds ``kernel [D, E]`` so the path reads ``router/kernel`` like a ``Linear``'s."""

    def __init__(self, kernel):
        self.kernel = nnx.Param(kernel)


class MoEMLP(nnx.Module):
    """Router plus ``num_experts`` SwiGLU experts. Params: ``router/kernel [D, E]`` (no bias),
    ``gate_proj``/``up_proj [E, D, F]``, ``down_proj [E, F, D]`` (stacked experts, ``[in, out]``
    per expert like our ``Linear`` kernels; see the module docstring for the HF names)."""

    def __init__(self, *, hidden_size: int, moe_intermediate_size: int, num_experts: int,
                 top_k: int, norm_topk_prob: bool, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        init = nnx.initializers.normal(0.02)
        d, f, e = hidden_size, moe_intermediate_size, num_experts
        self.router = _Router(init(rngs.params(), (d, e), param_dtype))
        self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), param_dtype))
        self.top_k, self.norm_topk_prob, self.dtype = top_k, norm_topk_prob, jnp.dtype(dtype)

    def __call__(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"],
                                                         Float[Array, "N E"]]:
        """``(out [B, T, D] in dtype, router_logits [B*T, E] float32)``; feed the logits (all
        layers stacked) and ``route``'s experts to ``load_balancing_loss``."""
        lead, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d).astype(self.dtype)  # [N, D]
        logits = jnp.dot(xf, self.router.kernel[...].astype(self.dtype),
                         preferred_element_type=jnp.float32)  # [N, E]
        weights, experts = route(logits, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob)
        out = expert_mlp(xf, weights, experts, self.gate_proj[...], self.up_proj[...],
                         self.down_proj[...])
        return out.reshape(*lead, d), logits


# ----------------------------------------------------------------- Hugging Face weight layout
def stack_experts(gate: Sequence[np.ndarray], up: Sequence[np.ndarray],
                  down: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-expert torch ``Linear`` weights (gate/up ``[F, D]``, down ``[D, F]``, ``[out, in]``)
    -> our ``(gate_proj [E, D, F], up_proj [E, D, F], down_proj [E, F, D])``."""
    t = lambda ws: np.stack([np.asarray(w).T for w in ws])  # noqa: E731
    return t(gate), t(up), t(down)


def unstack_experts(gate_proj, up_proj, down_proj) -> tuple[list, list, list]:
    """Inverse of ``stack_experts``: three lists of ``E`` torch-layout ``[out, in]`` arrays."""
    u = lambda w: [np.ascontiguousarray(np.asarray(x).T) for x in w]  # noqa: E731
    return u(gate_proj), u(up_proj), u(down_proj)


def from_fused(gate_up_proj: np.ndarray, down_proj: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transformers 5.x in-memory ``experts.gate_up_proj [E, 2F, D]`` (gate rows first) and
    ``experts.down_proj [E, D, F]`` -> our ``(gate_proj, up_proj, down_proj)``."""
    gu = np.asarray(gate_up_proj)
    f = gu.shape[1] // 2
    return (np.swapaxes(gu[:, :f], 1, 2), np.swapaxes(gu[:, f:], 1, 2),
            np.swapaxes(np.asarray(down_proj), 1, 2))


def to_fused(gate_proj, up_proj, down_proj) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``from_fused``: ``(gate_up_proj [E, 2F, D], down_proj [E, D, F])``."""
    t = lambda w: np.swapaxes(np.asarray(w), 1, 2)  # noqa: E731
    return np.concatenate([t(gate_proj), t(up_proj)], axis=1), t(down_proj)


def hf_moe_keys(prefix: str, *, family: str, num_experts: int) -> list[str]:
    """The Hub (per-expert) tensor names of one MoE block, e.g. ``prefix =
    "model.layers.3.mlp"`` (Qwen3-MoE) or ``"model.layers.3.block_sparse_moe"`` (Mixtral)."""
    names = HF_EXPERT_NAMES[family]
    return [f"{prefix}.gate.weight"] + [f"{prefix}.experts.{e}.{n}.weight"
                                        for e in range(num_experts) for n in names]


def moe_params_from_hf(tensors: Mapping[str, np.ndarray], prefix: str, *, family: str,
                       num_experts: int) -> dict:
    """``MoEMLP`` params from one block's HF tensors, per-expert (Hub) or fused (5.x) layout."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in tensors:
        g, u, d = from_fused(tensors[fused], tensors[f"{prefix}.experts.down_proj"])
    else:
        names = HF_EXPERT_NAMES[family]
        per = [[tensors[f"{prefix}.experts.{e}.{n}.weight"] for e in range(num_experts)]
               for n in names]
        g, u, d = stack_experts(*per)
    router = np.asarray(tensors[f"{prefix}.gate.weight"]).T
    return {"router": {"kernel": router}, "gate_proj": g, "up_proj": u, "down_proj": d}


def moe_params_to_hf(params: Mapping, prefix: str, *, family: str) -> dict[str, np.ndarray]:
    """``MoEMLP`` params -> the Hub's per-expert tensors (what ``save_pretrained`` writes)."""
    per = unstack_experts(params["gate_proj"], params["up_proj"], params["down_proj"])
    out = {f"{prefix}.gate.weight": np.ascontiguousarray(np.asarray(params["router"]["kernel"]).T)}
    for name, ws in zip(HF_EXPERT_NAMES[family], per):
        out |= {f"{prefix}.experts.{e}.{name}.weight": w for e, w in enumerate(ws)}
    return out
