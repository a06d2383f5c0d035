"""Sharding is data: per model family, a table from parameter paths to mesh axes.

A parameter's path is its keys joined by ``/`` (``layers/3/attn/q_proj/kernel``). The first rule
whose regex matches (``re.search``) gives the ``PartitionSpec``; a parameter no rule matches is an
error naming it, so a new parameter cannot silently end up replicated. ``nnx.Linear`` kernels are
``[in, out]``:

==========================  ==================  =============================================
parameter                   spec                why
==========================  ==================  =============================================
embed/embedding  [V, D]     (tensor, fsdp)      vocab split like the LM head (tied: its
                                                transpose ``[D, V]`` is (fsdp, tensor))
q/k/v_proj/kernel [D, H*K]  (fsdp, tensor)      heads split over ``tensor``
q/k/v_proj/bias  [H*K]      (tensor,)           split like the heads it belongs to
o_proj/kernel    [H*K, D]   (tensor, fsdp)      input heads split: one all-reduce per block
gate/up_proj     [D, F]     (fsdp, tensor)      MLP hidden split over ``tensor``
down_proj        [F, D]     (tensor, fsdp)      input hidden split: one all-reduce per block
lm_head/kernel   [D, V]     (fsdp, tensor)      vocab-parallel logits
norms [D], q/k_norm [K],    replicated          a few kilobytes; splitting costs more than it saves
heads' [D, 1]
==========================  ==================  =============================================

Mixture-of-experts blocks (``models.moe.MoEMLP``, ``MOE_RULES``; a MoE family's table is
``MOE_RULES + RULES``):

==========================  ==================  =============================================
mlp/router/kernel [D, E]    replicated          ``D*E`` is small; every token needs all E logits
mlp/gate|up_proj [E, D, F]  (fsdp, None,        whole experts per ``fsdp`` shard; each expert's
                            tensor)             hidden split over ``tensor`` (as the dense MLP)
mlp/down_proj    [E, F, D]  (fsdp, tensor,      same experts, input hidden split: one
                            None)               all-reduce per block
==========================  ==================  =============================================

There is no separate ``expert`` mesh axis: the expert dimension rides on ``fsdp``. Under jit
(GSPMD) that is ZeRO-3 storage, the experts all-gathered before use like any fsdp weight; the
layout (whole experts per shard) is the one a later expert-parallel dispatch (tokens moved to
their experts' devices with an all-to-all inside ``shard_map``) would use, so adding that keeps
the checkpoints' sharding. A fourth mesh axis would change ``MeshConfig``, ``parse_mesh``, the
batch axes and the CLI for no gain until that dispatch exists.

A split needs the dimension divisible by the axis size, and a split of heads needs the *head
count* divisible by it (a head is never cut in two). Where not, that dimension falls back to
replicated and ``plan_param_specs`` says why (``param_shardings`` logs it): e.g. 4 key/value heads
on ``tensor=8``.

LoRA and QLoRA params (``models.lora``) follow their base kernel's rule (``adapter_rules``, derived
from every ``.../kernel`` rule of the family): ``lora_a [in, r]`` splits ``in`` like the kernel's
input dimension, ``lora_b [r, out]`` splits ``out`` like its output dimension, ``r`` is
replicated; quantised codes (``kernel_int8 [in, out]``, ``kernel_nf4 [in/2, out]``) split like
the kernel, their scales split ``out``.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.parallel.placement import batch_axes

if TYPE_CHECKING:  # parallel/ sits beside models/; only the config's fields are read
    from rlhf_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


class Rule(NamedTuple):
    """``pattern`` (regex on the ``/``-joined path) -> ``spec``; ``heads`` pairs a dimension
    with the ``ModelConfig`` field counting the heads along it (split whole heads only)."""

    pattern: str
    spec: P
    heads: tuple[tuple[int, str], ...] = ()


_PROJ = r"(^|/)attn/"
RULES: tuple[Rule, ...] = (
    Rule(r"^embed/embedding$", P("tensor", "fsdp")),
    Rule(_PROJ + r"q_proj/kernel$", P("fsdp", "tensor"), ((1, "num_heads"),)),
    Rule(_PROJ + r"(k|v)_proj/kernel$", P("fsdp", "tensor"), ((1, "num_kv_heads"),)),
    Rule(_PROJ + r"q_proj/bias$", P("tensor"), ((0, "num_heads"),)),
    Rule(_PROJ + r"(k|v)_proj/bias$", P("tensor"), ((0, "num_kv_heads"),)),
    Rule(_PROJ + r"o_proj/kernel$", P("tensor", "fsdp"), ((0, "num_heads"),)),
    Rule(r"(^|/)mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),
    Rule(r"(^|/)mlp/down_proj/kernel$", P("tensor", "fsdp")),
    Rule(r"^lm_head/kernel$", P("fsdp", "tensor")),
    Rule(r"(^|/)(input_norm|post_attn_norm|attn_out_norm|mlp_out_norm|norm)/weight$", P()),
    Rule(_PROJ + r"(q|k)_norm/weight$", P()),  # per-head q/k norms [K]: shared by every head
    Rule(r"^(value_head|reward_head)/(kernel|bias)$", P()),
)

MOE_RULES: tuple[Rule, ...] = (
    Rule(r"(^|/)mlp/router/kernel$", P()),
    Rule(r"(^|/)mlp/(gate|up)_proj$", P("fsdp", None, "tensor")),
    Rule(r"(^|/)mlp/down_proj$", P("fsdp", "tensor", None)),
)
"""Rules for ``models.moe.MoEMLP`` at ``.../mlp`` (no ``/kernel`` suffix on the stacked experts,
so they cannot be mistaken for a dense MLP's kernels)."""


def adapter_rules(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """Rules for the LoRA/QLoRA params of each linear that ``rules`` give a ``.../kernel`` rule
    (see the module doc); head constraints move with the dimension they belong to."""
    out: list[Rule] = []
    for r in rules:
        if not r.pattern.endswith("kernel$") or len(r.spec) != 2:
            continue
        stem, (d_in, d_out) = r.pattern[:-len("kernel$")], tuple(r.spec)
        on_in = tuple(h for h in r.heads if h[0] == 0)
        on_out = tuple(h for h in r.heads if h[0] == 1)
        out += [Rule(stem + "lora_a$", P(d_in, None), on_in),
                Rule(stem + "lora_b$", P(None, d_out), on_out),
                Rule(stem + "kernel_(int8|nf4)$", r.spec, r.heads),
                Rule(stem + "kernel_scale$", P(d_out), tuple((0, f) for _, f in on_out)),
                Rule(stem + "kernel_absmax$", P(None, d_out), on_out)]
    return tuple(out)


# Every family shares one parameter layout: Qwen2 adds the q/k/v biases, Qwen3 and Gemma 3 the
# q/k norms, Gemma the sandwich norms; Phi-3's fused checkpoint tensors are split on import. The
# mixture-of-experts families add the expert rules in front (Qwen3-MoE's dense layers use RULES).
FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    **{f: RULES for f in ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3")},
    **{f: MOE_RULES + RULES for f in ("qwen3_moe", "mixtral")}}


class ShardingPlan(NamedTuple):
    """``specs``: a ``PartitionSpec`` per parameter (same tree as the params);
    ``fallbacks``: ``{path: reason}`` for each dimension left replicated against its rule."""

    specs: Any
    fallbacks: dict[str, str]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path) -> str:
    """``(DictKey('layers'), DictKey(0), ...)`` -> ``"layers/0/..."``."""
    return "/".join(_key_name(k) for k in path)


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def _fit(rule: Rule, name: str, shape: tuple[int, ...], config: ModelConfig,
         mesh: Mesh) -> tuple[P, list[str]]:
    """The rule's spec padded to ``len(shape)``, with unsplittable dimensions replicated."""
    if len(rule.spec) > len(shape):
        raise ValueError(f"sharding rule {rule.pattern!r} has {len(rule.spec)} dims but "
                         f"parameter {name} has shape {shape}")
    heads = dict(rule.heads)
    out, why = [], []
    for dim, axis in enumerate(tuple(rule.spec) + (None,) * (len(shape) - len(rule.spec))):
        n = 1 if axis is None else _axis_size(mesh, axis)
        if n == 1:  # nothing to split (an axis of size 1 is kept: it costs nothing)
            out.append(axis)
            continue
        units, unit_name = shape[dim], "size"
        if dim in heads:
            units, unit_name = getattr(config, heads[dim]), heads[dim]
        if shape[dim] % n or units % n:
            why.append(f"dim {dim} ({unit_name} {units}) is not divisible by {axis}={n}")
            axis = None
        out.append(axis)
    return P(*out), why


def plan_param_specs(model_config: ModelConfig, params, mesh: Mesh) -> ShardingPlan:
    """A ``PartitionSpec`` for every parameter of a ``model_config.family`` model on ``mesh``.

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` (``models.abstract_params``). Raises
    when a parameter matches no rule.
    """
    if model_config.family not in FAMILY_RULES:
        raise ValueError(f"no sharding rules for family {model_config.family!r}; "
                         f"known: {sorted(FAMILY_RULES)}")
    rules = FAMILY_RULES[model_config.family]
    rules = rules + adapter_rules(rules)
    fallbacks: dict[str, str] = {}

    def spec(path, leaf):
        name = path_str(path)
        rule = next((r for r in rules if re.search(r.pattern, name)), None)
        if rule is None:
            raise ValueError(f"no sharding rule for parameter {name!r} (shape {leaf.shape}) in "
                             f"the {model_config.family!r} table; add one to parallel.rules")
        s, why = _fit(rule, name, tuple(leaf.shape), model_config, mesh)
        if why:
            fallbacks[name] = "; ".join(why) + f" -> {s}"
        return s

    specs = jax.tree_util.tree_map_with_path(spec, params)
    return ShardingPlan(specs, fallbacks)


def param_shardings(model_config: ModelConfig, params, mesh: Mesh):
    """A ``NamedSharding`` per parameter (same tree as ``params``); fallbacks are logged."""
    plan = plan_param_specs(model_config, params, mesh)
    for name, reason in plan.fallbacks.items():
        log.info("sharding fallback for %s: %s", name, reason)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), plan.specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh) -> P:
    """Leading (batch) axis split over ``data`` and ``fsdp`` together; ``tensor`` replicates."""
    return P(batch_axes(mesh))


def shard_params(params, shardings):
    """Place ``params`` (host or device arrays) with ``shardings`` (``param_shardings``)."""
    return jax.device_put(params, shardings)


def opt_state_shardings(opt_state, param_shardings, mesh: Mesh, *, params=None):
    """Shardings for an optimizer state that follow the parameters'.

    A leaf whose path ends with a parameter's path (optax's Adam ``mu``/``nu`` mirror the params
    tree) and whose shape is the parameter's gets that parameter's sharding; everything else
    (step counts, factored or reshaped statistics) is replicated. Without ``params`` the shape is
    checked against the sharding: same rank, every split dimension divisible.
    """
    by_path: dict[tuple[str, ...], tuple[NamedSharding, tuple[int, ...] | None]] = {}
    shapes = ({} if params is None else
              {tuple(_key_name(k) for k in p): tuple(x.shape)
               for p, x in jax.tree_util.tree_leaves_with_path(params)})
    for p, sh in jax.tree_util.tree_leaves_with_path(
            param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
        key = tuple(_key_name(k) for k in p)
        by_path[key] = (sh, shapes.get(key))
    lengths = sorted({len(k) for k in by_path}, reverse=True)
    replicated = NamedSharding(mesh, P())

    def fits(sh: NamedSharding, shape, want) -> bool:
        if want is not None:
            return tuple(shape) == want
        spec = sh.spec
        if len(spec) != len(shape):
            return False
        return all(a is None or d % _axis_size(sh.mesh, a) == 0 for a, d in zip(spec, shape))

    def pick(path, leaf):
        names = tuple(_key_name(k) for k in path)
        for n in lengths:
            if n <= len(names) and names[-n:] in by_path:
                sh, want = by_path[names[-n:]]
                if fits(sh, leaf.shape, want):
                    return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)
