"""LoRA and QLoRA at the model layer: a graph with adapter params, and the adapter as a pytree.

LoRA (Hu et al. 2021) freezes a linear's kernel ``W [in, out]`` and learns a low-rank update::

    y = x W (+ b) + s * ((dropout(x) A) B),   A [in, r], B [r, out],
    s = alpha / r           (LoRA),   or   alpha / sqrt(r)   (rsLoRA, Kalajdzievski 2023).

``A`` starts like PEFT's (kaiming-uniform with ``a = sqrt(5)``: ``U(-1/sqrt(in), 1/sqrt(in))``),
``B`` at zero, so with a fresh adapter each linear's output is bitwise the base's (and so is
the model's op by op; compiled, XLA fuses the ``+ 0`` into the next elementwise fusion, which can
move the logits by a few float32 ulps: 4.2e-7 measured). QLoRA (Dettmers et al. 2023) stores
the frozen ``W`` quantised (``models.quantize``: int8 or NF4) and dequantises it on the fly in
the forward.

How it fits the pure-function models (``transformer.Model``):

* ``lora_model(base, cfg)`` is a ``Model`` (``LoraModel``) whose graph replaces each targeted
  ``FlatLinear`` under ``layers`` with a ``LoraLinear`` carrying ``lora_a``/``lora_b`` params (and,
  with ``quantize_base``, every block linear with one whose ``kernel`` is codes plus scales).
  Its params are ``combine(base, adapter)``: a plain nested-dict union, so under ``jit`` nothing
  is copied, and the trainer differentiates with respect to ``adapter`` alone: XLA then emits no
  ``[in, out]`` gradient for any frozen matrix (``tests/models/test_lora.py`` checks the HLO).
* The adapter mirrors the base paths: ``{"layers": {0: {"attn": {"q_proj": {"lora_a": [in, r],
  "lora_b": [r, out]}}}}}``, float32 whatever the base dtype (it is what the optimizer updates).
* The reference (adapter-off) model is the plain base ``Model`` on the same base params; with a
  quantised base (which the plain ``Model`` cannot read) it is this model with ``B = 0`` (a fresh
  ``init_adapter``), i.e. the quantised base the policy starts from.
* Dropout (on the adapter's input, as in PEFT) is active only when ``cfg.dropout > 0`` *and* the
  params carry a key: ``combine(base, adapter, dropout_key=key)``. Each adapted linear draws its
  mask from ``fold_in(key, its index)``; without a key the model is deterministic (evaluation,
  sampling). The key rides in the params so every function of ``(model, params)`` (scoring,
  losses) gets dropout without a new argument.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict as _leaves  # {path tuple: leaf}
from flax.traverse_util import unflatten_dict as _nest

from rlhf_jax.models import quantize as qz
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import FlatLinear
from rlhf_jax.models.transformer import Model, Transformer, abstract_params

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_KEYS = ("lora_a", "lora_b")
DROPOUT_KEY = "lora_dropout_key"
"""Top-level params entry holding the dropout key (``combine(..., dropout_key=...)``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which linears get an adapter, its size and scale, and how the frozen base is stored."""

    rank: int = 16
    """Adapter rank ``r``."""
    alpha: float = 32.0
    """Scale numerator: the update is ``alpha / r * A B`` (``alpha / sqrt(r)`` with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (needs a key, see the module doc)."""
    targets: tuple[str, ...] = TARGETS
    """Names of the block linears to adapt (checked against those the model has; kept sorted)."""
    rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023)."""
    quantize_base: str | None = None
    """Store the frozen block linears as ``"int8"`` or ``"nf4"`` (QLoRA); None: as they are."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"targets must be a non-empty tuple of names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(sorted(set(self.targets))))  # order-free
        if self.quantize_base is not None:
            qz.quantized_names(self.quantize_base)

    @property
    def scale(self) -> float:
        """``s`` in ``y = x W + s * x A B``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


class LoraLinear(FlatLinear):
    """A block linear with an optional adapter (``rank > 0``) and optionally quantised kernel.

    ``y = x W (+ b) + scale * ((dropout(x) A) B)`` on the ``[N, in]`` flattening of ``x``; with no
    adapter the float path is ``FlatLinear``'s own call, so the numbers are the base model's. The
    delta runs in the compute dtype like the base matmul.
    """

    def __init__(self, base: FlatLinear, *, rank: int, scale: float, dropout: float,
                 quantize: str | None, index: int):
        super().__init__(base.in_features, base.out_features, use_bias=base.use_bias,
                         dtype=base.dtype, param_dtype=base.param_dtype, rngs=nnx.Rngs(0))
        self.rank, self.scale, self.dropout, self.index = rank, scale, dropout, index
        self.quantize = quantize
        if rank:
            self.lora_a = nnx.Param(jnp.zeros((base.in_features, rank), jnp.float32))
            self.lora_b = nnx.Param(jnp.zeros((rank, base.out_features), jnp.float32))
        if quantize is not None:
            q = qz.quantize_kernel(self.kernel[...], quantize)
            del self.kernel
            for name, value in q.items():
                setattr(self, name, nnx.Param(value))

    def _dense(self, x):
        q = {n: getattr(self, n)[...] for n in qz.quantized_names(self.quantize)}
        kernel = qz.dequantize(q, self.in_features, self.param_dtype)
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = self.dot_general(x, kernel, (((1,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + bias[None]

    def _delta(self, x):
        key = _DROPOUT.get()
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.index), 1.0 - self.dropout,
                                        x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return (x @ a) @ b * jnp.asarray(self.scale, x.dtype)  # [N, r] then [N, out]

    def __call__(self, x, **kwargs):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        y = nnx.Linear.__call__(self, x2, **kwargs) if self.quantize is None else self._dense(x2)
        if self.rank:
            y = y + self._delta(x2).astype(y.dtype)
        return y.reshape(*lead, -1)


@dataclasses.dataclass(frozen=True)
class LoraModel(Model):
    """A ``Model`` whose graph has LoRA linears; ``lora`` is the configuration it was built with.
    ``apply`` takes ``combine(base, adapter[, dropout_key=...])``."""

    lora: LoraConfig

    def apply(self, params, tokens, **kwargs):
        key = params.get(DROPOUT_KEY)
        if DROPOUT_KEY in params:
            params = {k: v for k, v in params.items() if k != DROPOUT_KEY}
        token = _DROPOUT.set(key if self.lora.dropout > 0 else None)
        try:
            return super().apply(params, tokens, **kwargs)
        finally:
            _DROPOUT.reset(token)


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _block_linears(module: Transformer) -> list[tuple[tuple, FlatLinear]]:
    """``(path, linear)`` for every ``FlatLinear`` inside ``module.layers``, in graph order."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(module)
            if p and p[0] == "layers" and type(m) is FlatLinear]


def _build(config: ModelConfig, lora: LoraConfig) -> Transformer:
    module = Transformer(config, rngs=nnx.Rngs(params=0))
    linears = _block_linears(module)
    names = sorted({p[-1] for p, _ in linears})
    unknown = [t for t in lora.targets if t not in names]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} name no linear of this model; its block "
                         f"linears are {names}")
    index = 0
    for path, linear in linears:
        rank = lora.rank if path[-1] in lora.targets else 0
        if not rank and lora.quantize_base is None:
            continue
        parent = functools.reduce(_child, path[:-1], module)
        setattr(parent, path[-1], LoraLinear(linear, rank=rank, scale=lora.scale,
                                             dropout=lora.dropout, quantize=lora.quantize_base,
                                             index=index))
        index += 1
    return module


@functools.lru_cache(maxsize=32)
def _graph(config: ModelConfig, lora: LoraConfig):
    module = nnx.eval_shape(lambda: _build(config, lora))
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def lora_model(base: Model | ModelConfig, lora: LoraConfig) -> LoraModel:
    """The LoRA (QLoRA with ``lora.quantize_base``) model of a base ``Model`` or its config."""
    if isinstance(base, LoraModel):
        raise ValueError("lora_model takes the base model, not a LoRA model")
    config = base.config if isinstance(base, Model) else base
    return LoraModel(config, _graph(config, lora)[0], lora)


def abstract_lora_params(model: LoraModel) -> dict:
    """Shapes and dtypes of ``combine(base, adapter)`` for ``model`` (``ShapeDtypeStruct``)."""
    return jax.tree.map(lambda x: x, _graph(model.config, model.lora)[1])  # a fresh tree


def adapter_shapes(model: LoraModel) -> dict:
    """The adapter tree of ``model``: ``lora_a [in, r]`` and ``lora_b [r, out]`` per adapted
    linear, as ``jax.ShapeDtypeStruct`` (float32)."""
    return split(abstract_lora_params(model))[1]


def init_adapter(model: LoraModel, key: jax.Array) -> dict:
    """A fresh adapter: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's kaiming-uniform, ``a =
    sqrt(5)``), ``B = 0``; linear ``i`` (sorted paths) draws from ``fold_in(key, i)``."""
    flat = _leaves(adapter_shapes(model))
    out = {}
    for i, path in enumerate(sorted({p[:-1] for p in flat}, key=str)):
        a, b = flat[path + ("lora_a",)], flat[path + ("lora_b",)]
        bound = 1.0 / math.sqrt(a.shape[0])
        out[path + ("lora_a",)] = jax.random.uniform(jax.random.fold_in(key, i), a.shape,
                                                     jnp.float32, -bound, bound)
        out[path + ("lora_b",)] = jnp.zeros(b.shape, jnp.float32)
    return _nest(out)


def combine(base: dict, adapter: dict, *, dropout_key: jax.Array | None = None) -> dict:
    """``base`` and ``adapter`` as one params tree (a nested-dict union; no array is copied).
    With ``dropout_key`` the adapters' dropout is on (see the module doc)."""
    flat, extra = _leaves(base), _leaves(adapter)
    clash = sorted(str(p) for p in set(flat) & set(extra))
    if clash:
        raise ValueError(f"adapter and base both hold {clash}")
    out = _nest({**flat, **extra})
    if dropout_key is not None:
        out[DROPOUT_KEY] = dropout_key
    return out


def split(params: dict) -> tuple[dict, dict]:
    """``combine``'s inverse: ``(base, adapter)``, the adapter being every ``lora_a``/``lora_b``."""
    flat = _leaves({k: v for k, v in params.items() if k != DROPOUT_KEY})
    base = {p: v for p, v in flat.items() if p[-1] not in ADAPTER_KEYS}
    adapter = {p: v for p, v in flat.items() if p[-1] in ADAPTER_KEYS}
    return _nest(base), _nest(adapter)


def quantize_base(base: dict, model: LoraModel) -> dict:
    """The base params with each block linear's ``kernel`` replaced by the quantised form
    ``model`` expects (``model.lora.quantize_base``; see ``models.quantize``)."""
    mode = model.lora.quantize_base
    if mode is None:
        raise ValueError("model's LoraConfig has quantize_base=None: nothing to quantise")
    codes = qz.quantized_names(mode)[0]
    flat = _leaves(base)
    for path in _leaves(split(abstract_lora_params(model))[0]):
        if path[-1] == codes:
            kernel = path[:-1] + ("kernel",)
            if kernel not in flat:
                raise ValueError(f"base params lack {'/'.join(map(str, kernel))}")
            flat.update({path[:-1] + (n,): v
                         for n, v in qz.quantize_kernel(flat.pop(kernel), mode).items()})
    return _nest(flat)


def merge_adapter(base: dict, adapter: dict, lora: LoraConfig) -> dict:
    """Plain base params with the update folded in, ``W' = W + s * A B`` (float32 sum, stored
    in ``W``'s dtype): the export form, for ``save_hf_checkpoint`` or a base ``Model``."""
    flat, ad = _leaves(base), _leaves(adapter)
    for path in sorted({p[:-1] for p in ad}, key=str):
        kernel = path + ("kernel",)
        if kernel not in flat:
            raise ValueError(f"no float kernel at {'/'.join(map(str, kernel))} to merge into "
                             "(a quantised base cannot be merged: merge into the float weights)")
        w = flat[kernel]
        delta = ad[path + ("lora_a",)].astype(jnp.float32) @ ad[path + ("lora_b",)].astype(
            jnp.float32)
        flat[kernel] = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
    return _nest(flat)


def dequantize_base(base: dict, model: LoraModel) -> dict:
    """``quantize_base``'s inverse up to rounding: every quantised kernel as a float ``kernel``
    in the model's ``param_dtype`` (for a merged export of a QLoRA run)."""
    mode = model.lora.quantize_base
    if mode is None:
        return base
    codes, scales = qz.quantized_names(mode)
    flat = _leaves(base)
    for path in [p for p in flat if p[-1] == codes]:
        stem = path[:-1]
        q = {codes: flat.pop(stem + (codes,)), scales: flat.pop(stem + (scales,))}
        d_in = _leaves(abstract_base_shapes(model.config))[stem + ("kernel",)].shape[0]
        flat[stem + ("kernel",)] = qz.dequantize(q, d_in, jnp.dtype(model.config.param_dtype))
    return _nest(flat)


def abstract_base_shapes(config: ModelConfig) -> dict:
    """Shapes and dtypes of the plain (unquantised) base params of ``config``."""
    return abstract_params(config)
