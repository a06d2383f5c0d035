"""Hugging Face checkpoint import and export (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2,
Gemma 3 text, Qwen3-MoE, Mixtral; safetensors only).

``load_hf_checkpoint(dir)`` reads ``config.json`` and ``model.safetensors`` (or the shards named
by ``model.safetensors.index.json``) and returns ``(ModelConfig, params)`` for
``transformer.Model``; ``save_hf_checkpoint(dir, config, params)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads with no missing or unexpected
keys. Import then export then import is bitwise exact. ``generation_config.json`` (sampling
defaults and the bos/eos/pad ids ``generate()`` uses) is read by ``load_generation_config`` and
written by ``save_hf_checkpoint(..., generation_config=...)``, which also copies the token ids
into ``config.json``.

Layout: torch ``Linear`` weights are ``[out, in]`` and are transposed to our ``[in, out]``
kernels; embeddings and norms are copied. Phi-3's fused ``qkv_proj`` (rows q, k, v) and
``gate_up_proj`` (rows gate, up) are split into our separate projections on import and
concatenated back on export (exact both ways). Mixture-of-experts layers (``models.moe``)
read the per-expert tensors ``save_pretrained`` writes and the Hub holds (Qwen3-MoE
``mlp.experts.{e}.{gate,up,down}_proj``, Mixtral ``block_sparse_moe.experts.{e}.w{1,3,2}``, each
``[out, in]``) into stacked ``[E, in, out]`` experts, and the router ``gate.weight [E, D]``
into ``router/kernel [D, E]`` (HF ``modeling_qwen3_moe.py``, ``modeling_mixtral.py``;
transformers 5's in-memory fused ``gate_up_proj`` is not a file layout and is not read here).
``*ForSequenceClassification`` with one label maps to
``heads=("reward",)`` through ``score.weight`` (``[1, D]``, no bias). The value head has no
Hugging Face equivalent: it is stored next to the weights in ``value_head.safetensors``
(``value_head.weight [1, D]``, ``value_head.bias [1]``, torch layout) and loaded when present.

Checks: every expected tensor is present, every stored tensor is used (rotary ``inv_freq``
buffers excepted), shapes match the config, and unsupported features (rope types other than
``linear`` and ``llama3``, Qwen sliding windows, Llama attention biases, ...) raise an error
naming the field. ``config.json`` mapping: ``models._hf_config``.
Pickle-based weights are refused; see ``_hf_io`` for the path checks.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax.traverse_util import flatten_dict as _leaves  # {path tuple: leaf}
from flax.traverse_util import unflatten_dict as _nest

from rlhf_jax.models import _hf_io as io
from rlhf_jax.models._hf_config import ARCHITECTURES, GEMMA, config_from_hf, config_to_hf
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.moe import HF_EXPERT_NAMES
from rlhf_jax.models.transformer import abstract_params

__all__ = ["ARCHITECTURES", "TOKEN_ID_KEYS", "config_from_hf", "config_to_hf",
           "load_hf_checkpoint", "load_generation_config", "save_hf_checkpoint"]

_HARMLESS = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The generation_config.json keys that are token ids (also copied into config.json)."""


class _Slot(NamedTuple):
    """Where one of our params lives in the checkpoint: tensor ``name``, stored transposed
    (torch ``Linear`` ``[out, in]``), and for a fused tensor (Phi-3's ``qkv_proj``,
    ``gate_up_proj``) the ``rows`` ``(start, stop)`` of torch's output axis that are ours."""

    name: str
    transpose: bool
    rows: tuple[int, int] | None = None
    experts: int = 0
    """> 0: ``name`` holds ``{e}``; our param stacks those ``experts`` tensors on a new axis 0."""

    def names(self) -> list[str]:
        """The checkpoint tensors this slot reads (one per expert for stacked experts)."""
        return [self.name.format(e=e) for e in range(self.experts)] if self.experts else [
            self.name]


def _layer_names(config: ModelConfig, i: int) -> dict[tuple, _Slot]:
    """Block ``i``'s params; Phi-3 stores q/k/v and gate/up fused (``_Slot.rows``), a
    mixture of experts one tensor per expert (``_Slot.experts``)."""
    p, ours, m = f"model.layers.{i}.", ("layers", i), {}
    k, f = config.dim_per_head, config.intermediate_size
    sizes = {"q": config.num_heads * k, "k": config.num_kv_heads * k, "v": config.num_kv_heads * k}
    start = 0
    for n in ("q", "k", "v", "o"):
        attn, hf = ours + ("attn", f"{n}_proj"), f"{p}self_attn.{n}_proj"
        if config.family == "phi3" and n != "o":
            m[attn + ("kernel",)] = _Slot(f"{p}self_attn.qkv_proj.weight", True,
                                          (start, start + sizes[n]))
            start += sizes[n]
        else:
            m[attn + ("kernel",)] = _Slot(f"{hf}.weight", True)
        if config.qkv_bias and n != "o":
            m[attn + ("bias",)] = _Slot(f"{hf}.bias", False)
    sparse = config.mlp_kinds()[i] == "moe"
    if sparse:
        m.update(_moe_names(config, i))
    for n in () if sparse else ("gate", "up", "down"):
        path = ours + ("mlp", f"{n}_proj", "kernel")
        if config.family == "phi3" and n != "down":
            rows = (0, f) if n == "gate" else (f, 2 * f)
            m[path] = _Slot(f"{p}mlp.gate_up_proj.weight", True, rows)
        else:
            m[path] = _Slot(f"{p}mlp.{n}_proj.weight", True)
    gemma = config.family in GEMMA
    norms = {"input_norm": "input_layernorm",
             "post_attn_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"}
    if config.sandwich_norms:
        norms.update(attn_out_norm="post_attention_layernorm",
                     mlp_out_norm="post_feedforward_layernorm")
    for ours_name, hf_name in norms.items():
        m[ours + (ours_name, "weight")] = _Slot(f"{p}{hf_name}.weight", False)
    if config.qk_norm:
        for n in ("q", "k"):
            m[ours + ("attn", f"{n}_norm", "weight")] = _Slot(f"{p}self_attn.{n}_norm.weight",
                                                              False)
    return m


def _moe_names(config: ModelConfig, i: int) -> dict[tuple, _Slot]:
    """Block ``i``'s mixture of experts: the router and one tensor per expert and projection."""
    p = f"model.layers.{i}.{'block_sparse_moe' if config.family == 'mixtral' else 'mlp'}"
    ours, e = ("layers", i, "mlp"), config.num_experts
    m = {ours + ("router", "kernel"): _Slot(f"{p}.gate.weight", True)}
    for n, hf in zip(("gate", "up", "down"), HF_EXPERT_NAMES.get(config.family, (
            "gate_proj", "up_proj", "down_proj"))):
        m[ours + (f"{n}_proj",)] = _Slot(f"{p}.experts.{{e}}.{hf}.weight", True, experts=e)
    return m


def _names(config: ModelConfig) -> dict[tuple, _Slot]:
    """Our param path -> its ``_Slot`` in the checkpoint."""
    m = {("embed", "embedding"): _Slot("model.embed_tokens.weight", False),
         ("norm", "weight"): _Slot("model.norm.weight", False)}
    for i in range(config.num_layers):
        m.update(_layer_names(config, i))
    if "lm" in config.heads and not config.tie_embeddings:
        m[("lm_head", "kernel")] = _Slot("lm_head.weight", True)
    if "reward" in config.heads:
        m[("reward_head", "kernel")] = _Slot("score.weight", True)
    if "value" in config.heads:
        m[("value_head", "kernel")] = _Slot("value_head.weight", True)
        m[("value_head", "bias")] = _Slot("value_head.bias", False)
    return m


def _table(config: ModelConfig) -> tuple[dict, dict]:
    names, shapes = _names(config), _leaves(abstract_params(config))
    if set(names) != set(shapes):  # the model changed its parameter tree: fail loudly
        diff = sorted(set(names) ^ set(shapes), key=str)
        raise RuntimeError(f"hf name table out of date with the model: {diff}")
    return names, shapes


_HEAD_TENSORS = {"reward": "score.weight", "value": "value_head.weight"}


def load_hf_checkpoint(directory: str | os.PathLike, *, dtype=None,
                       heads: tuple[str, ...] | None = None,
                       require: tuple[str, ...] = ()) -> tuple[ModelConfig, dict]:
    """Import a Hugging Face checkpoint directory (safetensors only).

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` or an index plus shards, and
        optionally ``value_head.safetensors``.
      dtype: parameter and compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``);
        default: the ``dtype``/``torch_dtype`` of ``config.json``.
      heads: output heads; default: the checkpoint's (``("lm",)`` for ``*ForCausalLM``,
        ``("reward",)`` for ``*ForSequenceClassification``, plus ``"value"`` when
        ``value_head.safetensors`` exists). A requested value/reward head the checkpoint lacks
        starts at zero; stored heads that were not requested are skipped.
      require: heads that must be stored, not started at zero (``("reward",)`` for a reward
        model that scores: a zero head gives every completion the reward 0).

    Returns:
      ``(config, params)``, params shaped like ``init_model(config, key)[1]``.
    """
    root = io.real_dir(directory)
    files = io.weight_files(root)  # checks names and refuses pickle before opening anything
    has_value = (root / io.VALUE_HEAD).exists()
    config = config_from_hf(io.read_json(root, "config.json"), dtype=dtype, heads=heads,
                            has_value_head=has_value)
    tensors = io.read_tensors(files)
    if has_value and "value" in config.heads:
        tensors.update(io.read_tensors([io.child(root, io.VALUE_HEAD, "value head file")]))
    names, shapes = _table(config)
    zero_init = _check_tensor_names(root, config, tensors, names, require)
    target = jnp.dtype(config.param_dtype)
    expected = _hf_shapes(names, shapes)
    for name in {n for slot in names.values() for n in slot.names()} - zero_init:
        if tuple(tensors[name].shape) != expected[name]:
            raise ValueError(f"tensor {name!r} has shape {list(tensors[name].shape)}, expected "
                             f"{list(expected[name])} for this config")
    flat = {}
    for path, slot in names.items():
        if slot.name in zero_init:
            flat[path] = jnp.zeros(tuple(shapes[path].shape), target)
            continue
        if slot.experts:  # one [out, in] tensor per expert -> [E, in, out]
            value = np.stack([tensors[n].T if slot.transpose else tensors[n]
                              for n in slot.names()])
        else:
            value = tensors[slot.name]
            value = value if slot.rows is None else value[slot.rows[0]:slot.rows[1]]
            value = value.T if slot.transpose else value
        flat[path] = jnp.asarray(value.astype(target))
    return config, _nest(flat)


def _hf_shapes(names: dict[tuple, _Slot], shapes: dict) -> dict[str, tuple[int, ...]]:
    """Each checkpoint tensor's expected shape (torch layout); a fused one spans all its rows."""
    out: dict[str, tuple[int, ...]] = {}
    for path, slot in names.items():
        want = tuple(shapes[path].shape)[1 if slot.experts else 0:]  # one expert's
        hf = want[::-1] if slot.transpose else want
        if slot.rows is not None:
            hf = (max(out.get(slot.name, (0,))[0], slot.rows[1]),) + hf[1:]
        out.update(dict.fromkeys(slot.names(), hf))
    return out


def _check_tensor_names(root, config: ModelConfig, tensors: dict, names: dict[tuple, _Slot],
                        require: tuple[str, ...]) -> set[str]:
    """Every expected tensor present, every stored one used; returns the head tensors that
    start at zero (requested, not stored, not in ``require``)."""
    wanted = {n for slot in names.values() for n in slot.names()}
    skipped = {"lm_head.weight"} if "lm" not in config.heads else set()
    skipped |= {"score.weight"} if "reward" not in config.heads else set()
    if config.tie_embeddings and "lm_head.weight" in tensors and "lm" in config.heads:
        if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
        skipped.add("lm_head.weight")
    zero_init = {n for n in wanted if n in ("score.weight", "value_head.weight",
                                            "value_head.bias") and n not in tensors}
    absent = [h for h in require if _HEAD_TENSORS[h] in zero_init]
    if absent:
        arch = io.read_json(root, "config.json").get("architectures")
        raise ValueError(
            f"checkpoint {str(root)!r} ({arch}) stores no {absent[0]} head "
            f"({_HEAD_TENSORS[absent[0]]}): it would start at zero and score every completion "
            f"0. Give a trained reward model (e.g. the reward-model stage's model/, or a "
            f"*ForSequenceClassification checkpoint)")
    missing = sorted(n for n in wanted if n not in tensors and n not in zero_init)
    if missing:
        raise ValueError(f"checkpoint {str(root)!r} is missing tensors: {missing}")
    unexpected = sorted(k for k in tensors
                        if k not in wanted | skipped and not _HARMLESS.match(k))
    if unexpected:
        raise ValueError(f"checkpoint {str(root)!r} has unexpected tensors: {unexpected}")
    return zero_init


def load_generation_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``generation_config.json`` (sampling defaults such as temperature and
    top_p, and the bos/eos/pad token ids), or ``{}`` when it has none."""
    root = io.real_dir(directory)
    if not (root / io.GENERATION).exists():
        return {}
    return io.read_json(root, io.GENERATION)


def _check_token_ids(generation: Mapping[str, Any]) -> dict[str, Any]:
    """The token-id entries of ``generation`` (None values dropped), each an int (eos: or a
    non-empty list of ints)."""
    ids = {}
    for key in TOKEN_ID_KEYS:
        value = generation.get(key)
        if value is None:
            continue
        values = value if key == "eos_token_id" and isinstance(value, list) else [value]
        if not values or not all(type(v) is int and v >= 0 for v in values):
            raise ValueError(f"generation_config {key} must be a non-negative int"
                             f"{' or a non-empty list of them' if key == 'eos_token_id' else ''}"
                             f", got {value!r}")
        ids[key] = value
    return ids


def save_hf_checkpoint(directory: str | os.PathLike, config: ModelConfig, params: dict, *,
                       max_shard_bytes: int | None = None,
                       generation_config: Mapping[str, Any] | None = None) -> None:
    """Export ``(config, params)`` as a Hugging Face checkpoint directory.

    Writes ``config.json``, ``model.safetensors`` (or ``model-XXXXX-of-YYYYY.safetensors`` shards
    of at most ``max_shard_bytes`` each plus ``model.safetensors.index.json``), and
    ``value_head.safetensors`` when ``config`` has a value head. Tensors are stored in
    ``config.param_dtype``. With ``generation_config`` (a JSON object: sampling defaults plus
    ``bos_token_id``/``eos_token_id``/``pad_token_id``) it is written as
    ``generation_config.json`` and its token ids also go into ``config.json``; without it an
    existing ``generation_config.json`` is left alone. The directory is created if missing; a
    file in it that is a symlink leaving the directory is refused, and files are replaced by
    rename (never written through).
    """
    hf = config_to_hf(config)
    if generation_config is not None:
        hf.update(_check_token_ids(generation_config))
        generation_config = {k: v for k, v in generation_config.items() if v is not None}
    weights, value_head = _export_tensors(config, params)
    root = io.real_dir(directory, create=True)
    io.write_weights(root, weights, max_shard_bytes)
    if value_head:
        io.write_tensors(root, io.VALUE_HEAD, value_head)
    else:
        io.child(root, io.VALUE_HEAD, "output file").unlink(missing_ok=True)
    if generation_config is not None:
        io.write_json(root, io.GENERATION, generation_config)
    io.write_json(root, "config.json", hf)


def _export_tensors(config: ModelConfig, params: dict) -> tuple[dict, dict]:
    """``(weights, value head)``: Hugging Face names to contiguous arrays in torch layout."""
    names, shapes = _table(config)
    flat = _leaves(params)
    extra = sorted(str(p) for p in set(flat) - set(names))
    absent = sorted(str(p) for p in set(names) - set(flat))
    if extra or absent:
        raise ValueError(f"params do not match the config: missing {absent}, unexpected {extra}")
    target = jnp.dtype(config.param_dtype)
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for path, slot in names.items():
        value = np.asarray(jax.device_get(flat[path]))
        if value.shape != tuple(shapes[path].shape):
            raise ValueError(f"param {path} has shape {value.shape}, expected "
                             f"{tuple(shapes[path].shape)}")
        value = value.astype(target)
        if slot.experts:  # [E, in, out] -> one [out, in] tensor per expert
            for name, expert in zip(slot.names(), value):
                parts[name] = [(0, expert.T if slot.transpose else expert)]
            continue
        value = value.T if slot.transpose else value
        parts.setdefault(slot.name, []).append((0 if slot.rows is None else slot.rows[0], value))
    weights, value_head = {}, {}
    for name, pieces in parts.items():  # fused tensors: the pieces in row order
        value = np.concatenate([v for _, v in sorted(pieces, key=lambda x: x[0])], axis=0)
        (value_head if name.startswith("value_head.") else weights)[name] = \
            np.ascontiguousarray(value)
    return weights, value_head
