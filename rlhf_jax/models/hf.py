"""Hugging Face checkpoint import and export (Llama, Qwen2, Mistral; safetensors only).

``load_hf_checkpoint(dir)`` reads ``config.json`` and ``model.safetensors`` (or the shards named
by ``model.safetensors.index.json``) and returns ``(ModelConfig, params)`` for
``transformer.Model``; ``save_hf_checkpoint(dir, config, params)`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads with no missing or unexpected
keys. Import then export then import is bitwise exact. ``generation_config.json`` (sampling
defaults and the bos/eos/pad ids ``generate()`` uses) is read by ``load_generation_config`` and
written by ``save_hf_checkpoint(..., generation_config=...)``, which also copies the token ids
into ``config.json``.

Layout: torch ``Linear`` weights are ``[out, in]`` and are transposed to our ``[in, out]``
kernels; embeddings and norms are copied. ``*ForSequenceClassification`` with one label maps to
``heads=("reward",)`` through ``score.weight`` (``[1, D]``, no bias). The value head has no
Hugging Face equivalent: it is stored next to the weights in ``value_head.safetensors``
(``value_head.weight [1, D]``, ``value_head.bias [1]``, torch layout) and loaded when present.

Checks: every expected tensor is present, every stored tensor is used (rotary ``inv_freq``
buffers excepted), shapes match the config, and unsupported features (rope types other than
``llama3``, Qwen2 sliding windows, Llama attention biases, ...) raise an error naming the field.
Pickle-based weights are refused; see ``_hf_io`` for the path checks.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import _hf_io as io
from rlhf_jax.models.config import DTYPES, HEADS, ModelConfig, RopeScaling
from rlhf_jax.models.transformer import abstract_params

_PREFIX = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
# Hugging Face architecture -> (family, head its checkpoint carries): one visible table.
ARCHITECTURES = {f"{p}For{kind}": (fam, head) for fam, p in _PREFIX.items()
                 for kind, head in (("CausalLM", "lm"), ("SequenceClassification", "reward"))}
_HARMLESS = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The generation_config.json keys that are token ids (also copied into config.json)."""
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _unsupported(field: str, value, why: str) -> ValueError:
    return ValueError(f"config.json field {field!r} = {value!r} is not supported: {why}")


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """Rotary base and scaling from either layout: ``rope_parameters`` (transformers >= 5) or
    top-level ``rope_theta`` plus ``rope_scaling`` (earlier releases)."""
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    if not isinstance(params, dict):
        params, field = hf.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise _unsupported(field, params, "expected one flat object")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"{field}.partial_rotary_factor", params["partial_rotary_factor"],
                           "only full rotary embeddings")
    if kind in ("default", None):
        return theta, None
    if kind != "llama3":
        raise _unsupported(f"{field}.rope_type", kind, "only 'default' and 'llama3' rope")
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise ValueError(f"config.json {field} (llama3) lacks {missing}")
    return theta, RopeScaling(factor=float(params["factor"]),
                              low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(
                                  params["original_max_position_embeddings"]))


def _sliding_window(hf: dict, family: str) -> int | None:
    if family == "mistral":
        return hf.get("sliding_window")
    if family == "qwen2":
        if hf.get("use_sliding_window"):
            raise _unsupported("use_sliding_window", True, "Qwen2 per-layer sliding windows")
        if "sliding_attention" in (hf.get("layer_types") or []):
            raise _unsupported("layer_types", hf["layer_types"], "sliding-attention layers")
    return None


def _dtype_name(dtype, field: str) -> str:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise _unsupported(field, dtype, f"dtype must be one of {DTYPES}")
    return name


def config_from_hf(hf: dict, *, dtype=None, heads: tuple[str, ...] | None = None,
                   has_value_head: bool = False) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face ``config.json`` dict (see the module doc)."""
    archs = hf.get("architectures")
    known = [a for a in archs or [] if a in ARCHITECTURES]
    if len(known) != 1:
        raise _unsupported("architectures", archs, f"expected one of {sorted(ARCHITECTURES)}")
    family, stored_head = ARCHITECTURES[known[0]]
    if hf.get("model_type", family) != family:
        raise _unsupported("model_type", hf["model_type"], f"{known[0]} needs {family!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "the MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias", True, "MLP projections have no bias")
    if family != "qwen2" and hf.get("attention_bias"):
        raise _unsupported("attention_bias", True, "o_proj has no bias (use a Qwen2 checkpoint "
                           "for q/k/v biases)")
    if stored_head == "reward":
        labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
        if labels != 1:
            raise _unsupported("id2label/num_labels", labels, "a reward model has one label")
    if heads is None:  # canonical order, so an exported config reads back equal
        heads = tuple(h for h in HEADS if h == stored_head or (h == "value" and has_value_head))
    if not heads or len(set(heads)) != len(heads) or set(heads) - set(HEADS):
        raise ValueError(f"heads must be distinct names from {HEADS}, got {heads}")
    if "lm" in heads and stored_head != "lm":
        raise ValueError(f"heads={heads} asks for 'lm' but {known[0]} has no LM head")
    theta, scaling = _rope(hf)
    name = _dtype_name(dtype if dtype is not None else hf.get("dtype") or hf.get("torch_dtype")
                       or "float32", "dtype")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"), rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(hf, family),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        param_dtype=name, dtype=name, heads=tuple(heads))


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict for ``config`` (both rope layouts, for old and new readers)."""
    c = config
    if "lm" in c.heads and "reward" in c.heads:
        raise ValueError("heads with both 'lm' and 'reward' have no Hugging Face architecture")
    if "lm" not in c.heads and "reward" not in c.heads:
        raise ValueError("export needs an 'lm' or a 'reward' head")
    if c.qkv_bias != (c.family == "qwen2"):
        raise ValueError(f"family={c.family!r} with qkv_bias={c.qkv_bias} has no Hugging Face "
                         "equivalent (Qwen2 always has q/k/v biases, Llama/Mistral never)")
    if c.sliding_window is not None and c.family != "mistral":
        raise ValueError(f"sliding_window is exported for family 'mistral' only, not {c.family!r}")
    kind = "CausalLM" if "lm" in c.heads else "SequenceClassification"
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope.update(rope_type="llama3", **{k: getattr(c.rope_scaling, k) for k in _LLAMA3_KEYS})
    hf = {
        "architectures": [f"{_PREFIX[c.family]}For{kind}"], "model_type": c.family,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_embeddings, "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling is None else {k: v for k, v in rope.items()
                                                             if k != "rope_theta"},
        "dtype": c.param_dtype, "torch_dtype": c.param_dtype, "use_cache": True,
    }
    if c.head_dim is not None:
        hf["head_dim"] = c.head_dim
    if c.family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    if c.family == "mistral":
        hf["sliding_window"] = c.sliding_window
    if kind == "SequenceClassification":
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def _names(config: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Our param path -> (Hugging Face tensor name, transposed?)."""
    m = {("embed", "embedding"): ("model.embed_tokens.weight", False),
         ("norm", "weight"): ("model.norm.weight", False)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            attn, hf = ("layers", i, "attn", f"{n}_proj"), f"{p}self_attn.{n}_proj"
            m[attn + ("kernel",)] = (f"{hf}.weight", True)
            if config.qkv_bias and n != "o":
                m[attn + ("bias",)] = (f"{hf}.bias", False)
        for n in ("gate", "up", "down"):
            m[("layers", i, "mlp", f"{n}_proj", "kernel")] = (f"{p}mlp.{n}_proj.weight", True)
        m[("layers", i, "input_norm", "weight")] = (f"{p}input_layernorm.weight", False)
        m[("layers", i, "post_attn_norm", "weight")] = (f"{p}post_attention_layernorm.weight",
                                                         False)
    if "lm" in config.heads and not config.tie_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", True)
    if "reward" in config.heads:
        m[("reward_head", "kernel")] = ("score.weight", True)
    if "value" in config.heads:
        m[("value_head", "kernel")] = ("value_head.weight", True)
        m[("value_head", "bias")] = ("value_head.bias", False)
    return m


def _leaves(tree, prefix=()) -> dict[tuple, object]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, prefix + (key,)).items()}
    return {prefix: tree}


def _nest(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


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
    skipped = {"lm_head.weight"} if "lm" not in config.heads else set()
    skipped |= {"score.weight"} if "reward" not in config.heads else set()
    if config.tie_embeddings and "lm_head.weight" in tensors and "lm" in config.heads:
        if not np.array_equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise ValueError("tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
        skipped.add("lm_head.weight")
    zero_init = {n for n, _ in names.values()
                 if n in ("score.weight", "value_head.weight", "value_head.bias")
                 and n not in tensors}
    absent = [h for h in require if _HEAD_TENSORS[h] in zero_init]
    if absent:
        arch = io.read_json(root, "config.json").get("architectures")
        raise ValueError(
            f"checkpoint {str(root)!r} ({arch}) stores no {absent[0]} head "
            f"({_HEAD_TENSORS[absent[0]]}): it would start at zero and score every completion "
            f"0. Give a trained reward model (e.g. the reward-model stage's model/, or a "
            f"*ForSequenceClassification checkpoint)")
    missing = sorted(n for n, _ in names.values() if n not in tensors and n not in zero_init)
    if missing:
        raise ValueError(f"checkpoint {str(root)!r} is missing tensors: {missing}")
    used = {n for n, _ in names.values()} | skipped
    unexpected = sorted(k for k in tensors if k not in used and not _HARMLESS.match(k))
    if unexpected:
        raise ValueError(f"checkpoint {str(root)!r} has unexpected tensors: {unexpected}")
    target = jnp.dtype(config.param_dtype)
    flat = {}
    for path, (name, transpose) in names.items():
        want = tuple(shapes[path].shape)
        if name in zero_init:
            flat[path] = jnp.zeros(want, target)
            continue
        value = tensors[name]
        got = value.shape[::-1] if transpose else value.shape
        if tuple(got) != want:
            hf_want = want[::-1] if transpose else want
            raise ValueError(f"tensor {name!r} has shape {list(value.shape)}, expected "
                             f"{list(hf_want)} for this config")
        flat[path] = jnp.asarray((value.T if transpose else value).astype(target))
    return config, _nest(flat)


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
    weights, value_head = {}, {}
    for path, (name, transpose) in names.items():
        value = np.asarray(jax.device_get(flat[path]))
        if value.shape != tuple(shapes[path].shape):
            raise ValueError(f"param {path} has shape {value.shape}, expected "
                             f"{tuple(shapes[path].shape)}")
        value = np.ascontiguousarray((value.T if transpose else value).astype(target))
        (value_head if name.startswith("value_head.") else weights)[name] = value
    return weights, value_head
