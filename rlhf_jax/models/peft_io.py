"""PEFT interop: a LoRA adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

The layout is PEFT's (``peft.PeftModel.save_pretrained`` / ``from_pretrained``): tensor names
``base_model.model.<HF module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(torch ``Linear`` layout: our ``A [in, r]`` and ``B [r, out]`` transposed), the module names
being ``models.hf``'s (``model.layers.{i}.self_attn.q_proj``, ``model.layers.{i}.mlp.up_proj``).
Export then import is bitwise exact.

Import accepts what our forward computes and refuses the rest with an error naming the field
(``config_from_peft``): ``peft_type: LORA``, target modules given as a list of names, and every
other behaviour-changing option (DoRA, ``bias``, ``modules_to_save``, rank or alpha patterns,
``layers_to_transform``, ``fan_in_fan_out``, ...) at its neutral value. Files are written
atomically and checked like checkpoints (``_hf_io``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from rlhf_jax.models import _hf_io as io
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf import _names
from rlhf_jax.models.lora import (LoraConfig, LoraModel, _leaves, _nest, adapter_shapes,
                                  lora_model)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Written on export with their neutral values (what PEFT writes for plain LoRA).
_NEUTRAL = {"bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "lora_bias": False, "exclude_modules": None}
_READ = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora",
         "target_modules", "init_lora_weights")
# Metadata, or options that only shape how PEFT initialised the adapter (the saved weights are
# final) or that act only together with an option checked here (qalora_group_size: use_qalora).
_IGNORED = ("base_model_name_or_path", "revision", "inference_mode", "peft_version",
            "auto_mapping", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
            "corda_config", "lora_ga_config", "ensure_weight_tying")
_INIT_KEEPS_BASE = (True, False, "gaussian", "eva", "orthogonal")


def _module_names(config: ModelConfig) -> dict[tuple, str]:
    """Our linear path (``("layers", 0, "attn", "q_proj")``) -> HF module name."""
    out = {}
    for path, slot in _names(config).items():
        if path[0] == "layers" and path[-1] == "kernel":
            if slot.rows is not None:  # Phi-3's fused qkv_proj / gate_up_proj
                raise ValueError(f"{config.family}: PEFT adapts the fused {slot.name} as one "
                                 f"module; adapters on its parts have no PEFT layout")
            out[path[:-1]] = slot.name.removesuffix(".weight")
    return out


def save_peft_adapter(directory: str | os.PathLike, model: LoraModel, adapter: dict, *,
                      base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter`` (``init_adapter``'s tree for ``model``) as a PEFT LoRA adapter."""
    lora = model.lora
    modules = _module_names(model.config)
    want = {p: s.shape for p, s in _leaves(adapter_shapes(model)).items()}
    flat = _leaves(adapter)
    if set(flat) != set(want):
        raise ValueError(f"adapter does not match the model: missing "
                         f"{sorted(map(str, set(want) - set(flat)))}, unexpected "
                         f"{sorted(map(str, set(flat) - set(want)))}")
    tensors = {}
    for path, value in flat.items():
        value = np.asarray(jax.device_get(value), np.float32)
        if value.shape != want[path]:
            raise ValueError(f"adapter {path} has shape {value.shape}, expected {want[path]}")
        kind = "lora_A" if path[-1] == "lora_a" else "lora_B"
        tensors[f"{_PREFIX}{modules[path[:-1]]}.{kind}.weight"] = np.ascontiguousarray(value.T)
    hf = dict(_NEUTRAL)
    hf.update(peft_type="LORA", task_type="CAUSAL_LM" if "lm" in model.config.heads
              else "SEQ_CLS", r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
              use_rslora=lora.rslora, target_modules=sorted(lora.targets),
              base_model_name_or_path=base_model_name_or_path, inference_mode=True,
              init_lora_weights=True)
    root = io.real_dir(directory, create=True)
    io.write_tensors(root, WEIGHTS, tensors)
    io.write_json(root, CONFIG, hf)


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"{CONFIG} field {field!r} = {value!r} is not supported: {why}")


def config_from_peft(hf: dict) -> LoraConfig:
    """Our ``LoraConfig`` for a PEFT ``adapter_config.json`` dict.

    Any field outside ``_READ`` and ``_IGNORED`` must hold its neutral value (null, false, {},
    [], "none"): an option PEFT adds later (DoRA, biases, ``modules_to_save``, rank patterns,
    ...) changes the forward, so it is refused by name rather than silently dropped.
    """
    if hf.get("peft_type") != "LORA":
        raise _refuse("peft_type", hf.get("peft_type"), "only LoRA adapters ('LORA')")
    for field, value in hf.items():
        if field not in _READ + _IGNORED and value not in (None, False, {}, [], "none"):
            raise _refuse(field, value, "only plain LoRA (or rsLoRA) adapters are supported, "
                          f"with {field} at its default")
    if hf.get("init_lora_weights", True) not in _INIT_KEEPS_BASE:
        raise _refuse("init_lora_weights", hf["init_lora_weights"], "this initialisation "
                      "changes the base weights, which a plain base checkpoint lacks")
    targets = hf.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise _refuse("target_modules", targets, "give a list of module names (regex strings "
                      "and 'all-linear' are not resolved)")
    return LoraConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]),
                      dropout=float(hf.get("lora_dropout") or 0.0), targets=tuple(targets),
                      rslora=bool(hf.get("use_rslora", False)))


def load_peft_adapter(directory: str | os.PathLike, config: ModelConfig, *,
                      quantize_base: str | None = None) -> tuple[LoraModel, dict]:
    """Read a PEFT LoRA adapter for a base of ``config``: ``(lora model, adapter)``.

    Every stored tensor must be one the model expects, with its shape, and every expected one
    must be stored. ``quantize_base`` picks the QLoRA storage of the returned model's base.
    """
    root = io.real_dir(directory)
    lora = config_from_peft(io.read_json(root, CONFIG))
    if quantize_base is not None:
        lora = dataclasses.replace(lora, quantize_base=quantize_base)
    model = lora_model(config, lora)
    modules = _module_names(config)
    expect = {}
    for path, shape in _leaves(adapter_shapes(model)).items():
        kind = "lora_A" if path[-1] == "lora_a" else "lora_B"
        expect[f"{_PREFIX}{modules[path[:-1]]}.{kind}.weight"] = (path, tuple(shape.shape)[::-1])
    tensors = io.read_tensors([io.child(root, WEIGHTS, "adapter weights")])
    unexpected = sorted(set(tensors) - set(expect))
    missing = sorted(set(expect) - set(tensors))
    if unexpected or missing:
        raise ValueError(f"{WEIGHTS} in {str(root)!r}: unexpected tensors {unexpected[:8]}, "
                         f"missing {missing[:8]} (of {len(unexpected)} and {len(missing)})")
    flat = {}
    for name, (path, shape) in expect.items():
        value = tensors[name]
        if value.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {list(value.shape)}, expected "
                             f"{list(shape)} (r={lora.rank})")
        flat[path] = np.ascontiguousarray(value.T.astype(np.float32))
    return model, _nest(flat)
