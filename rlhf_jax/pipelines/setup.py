"""A stage's tokenizer, models and mesh: find the tokenizer (by default the checkpoint's own)
and check it against every checkpoint's, load or initialise a model, check lengths against it,
build the mesh and place params by the family's sharding rules. Every check here runs before
anything is compiled; the tokenizer checks before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax

from rlhf_jax import parallel
from rlhf_jax.data import Tokenizer
from rlhf_jax.data.tokenizer import check_compatible
from rlhf_jax.models import (Model, ModelConfig, get_preset, init_model, load_hf_checkpoint,
                             load_peft_adapter, model_for)
from rlhf_jax.models.hf import load_generation_config
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines.config import ModelSpec
from rlhf_jax.train.adapters import adapt


def load_tokenizer(given: str | None, field: str, spec: ModelSpec, *,
                   others: Mapping[str, ModelSpec | None] | None = None,
                   chat_template: str | None = None) -> Tokenizer:
    """The stage's tokenizer: ``given``, or by default the ``field`` model's checkpoint
    directory (``spec.path``; a preset has none, so ``tokenizer`` must then be given).

    Every checkpoint among ``spec`` and ``others`` (by config field name) that holds its own
    ``tokenizer.json`` must agree with it (``data.tokenizer.check_compatible``: vocabulary and
    bos/eos/pad ids), so a model never reads another tokenizer's ids. Called before the run
    directory is written. ``chat_template`` (``data.chat_template``): a Jinja file whose text
    replaces the tokenizer's template (and is exported with it).
    """
    if given is None and spec.path is None:
        raise ValueError(f"tokenizer is None, so it would be the {field} checkpoint's own, but "
                         f"{field} is the preset {spec.preset!r} (no path); set tokenizer to a "
                         f"directory with tokenizer.json")
    path = os.path.realpath(spec.path) if given is None else given  # realpath: no '..' left
    if given is None and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer is None, so it is read from {field}.path {path!r}, "
                                f"which has no tokenizer.json; set tokenizer to a tokenizer "
                                f"directory")
    tokenizer = Tokenizer.load(path)
    for name, other in {field: spec, **(others or {})}.items():
        own = None if other is None else other.path
        if (own is None or not os.path.isfile(os.path.join(own, "tokenizer.json"))
                or os.path.realpath(own) == os.path.realpath(path)):
            continue
        try:
            check_compatible(tokenizer, Tokenizer.load(os.path.realpath(own)),
                             names=("given" if given is not None else f"{field}'s",
                                    f"{name} checkpoint's"))
        except ValueError as e:
            where = f"tokenizer={given!r}" if given is not None else f"{field}.path={path!r}"
            raise ValueError(f"{e} ({where}, {name}.path={own!r})") from None
    if chat_template is not None:
        with open(chat_template, encoding="utf-8") as f:
            tokenizer = dataclasses.replace(tokenizer, chat_template=f.read())
    return tokenizer


def base_generation(spec: ModelSpec) -> dict[str, Any]:
    """The ``generation_config.json`` of the checkpoint a stage starts from (``{}`` for a
    preset or a checkpoint without one): its sampling defaults are kept in the export."""
    return {} if spec.path is None else load_generation_config(spec.path)


def load_model(spec: ModelSpec, *, heads: tuple[str, ...], vocab_size: int, seed: int,
               require: tuple[str, ...] = (), frozen: str | None = None):
    """``(Model, params)`` with exactly ``heads``; heads the checkpoint lacks start at zero,
    except those in ``require`` (a scoring reward model's), which are an error. ``frozen``:
    the config field of a model the stage never trains (an adapter there is refused)."""
    if frozen is not None and (spec.lora is not None or spec.adapter is not None):
        raise ValueError(f"{frozen}.lora / {frozen}.adapter: the {frozen} model is frozen in "
                         f"this stage; LoRA applies to the model it trains")
    if spec.path is not None:
        config, params = load_hf_checkpoint(spec.path, dtype=spec.dtype, heads=heads,
                                            require=require)
        if config.vocab_size < vocab_size:
            raise ValueError(f"model at {spec.path} has vocab_size {config.vocab_size} < the "
                             f"tokenizer's {vocab_size}")
        return model_for(config.replace(remat=spec.remat)), params
    extra = {"param_dtype": spec.dtype, "dtype": spec.dtype} if spec.dtype else {}
    extra |= {"remat": True} if spec.remat else {}
    both = sorted(set(extra) & set(spec.overrides))
    if both:
        raise ValueError(f"ModelSpec sets {both} twice: as its own field and in overrides")
    config = get_preset(spec.preset, vocab_size=vocab_size, heads=heads,
                        **dict(spec.overrides), **extra)
    return init_model(config, jax.random.PRNGKey(seed))


def with_adapter(spec: ModelSpec, model: Model, params, *, seed: int):
    """``(model, params, adapted)`` to train: unchanged for full fine-tuning (``adapted`` None);
    with ``spec.lora`` or ``spec.adapter`` the LoRA model, its trainable tree (a fresh adapter
    or the PEFT one, plus any head) and the ``train.Adapted`` holding the frozen base."""
    if spec.lora is None and spec.adapter is None:
        return model, params, None
    lora, adapter = spec.lora, None
    if spec.adapter is not None:
        quant = None if lora is None else lora.quantize_base
        lm, adapter = load_peft_adapter(spec.adapter, model.config, quantize_base=quant)
        lora = lm.lora
    adapted, trainable = adapt(model, params, lora, jax.random.PRNGKey(seed + 0x10A),
                               adapter=adapter)
    return adapted.model, trainable, adapted


def _too_long_for(models: Mapping[str, ModelConfig], need: int) -> tuple[str, int] | None:
    """The first model (name, positions) with fewer than ``need`` positions, else None."""
    return next(((name, c.max_position_embeddings) for name, c in models.items()
                 if need > c.max_position_embeddings), None)


def check_sequence_fits(models: Mapping[str, ModelConfig], *, prompt_width: int,
                        max_new_tokens: int) -> None:
    """Prompt + completion must fit every model's positions (the sampler's KV cache has
    ``prompt_width + max_new_tokens`` slots, ``prompt_width`` the prompts' padded width);
    checked before anything is compiled."""
    need = prompt_width + max_new_tokens
    short = _too_long_for(models, need)
    if short:
        raise ValueError(
            f"the prompts (padded to {prompt_width} tokens, at most data.max_prompt_length) + "
            f"sampling.max_new_tokens {max_new_tokens} = {need} tokens exceeds the {short[0]} "
            f"model's max_position_embeddings {short[1]} (the KV cache and position limit); "
            f"lower max_new_tokens or use shorter prompts")


def check_length_fits(models: Mapping[str, ModelConfig], length: int) -> None:
    """Training rows of ``length`` tokens (the data's padded length) must fit every model's
    positions; checked before anything is compiled."""
    short = _too_long_for(models, length)
    if short:
        raise ValueError(
            f"the data's rows are padded to {length} tokens (their longest, at most "
            f"data.max_length), beyond the {short[0]} model's max_position_embeddings "
            f"{short[1]}; lower data.max_length (with data.on_overflow='truncate' or 'skip') "
            f"or use shorter rows")


def make_mesh(mesh: MeshConfig | None, batch_size: int, *, what: str = "data.batch_size"):
    """The stage's ``data x fsdp x tensor`` mesh over all devices (every process's), or None
    when ``mesh`` is None or there is one device (plain single-device jit).

    Raises when ``batch_size`` does not split evenly over ``data x fsdp`` (checked before
    anything is compiled), and for ``mesh=None`` in a multi-process run (every process would
    train its own copy, and checkpoints cannot hold process-local arrays).
    """
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"mesh=None runs on one device, but this is a run of "
                         f"{jax.process_count()} processes; give a mesh (MeshConfig(): data "
                         f"parallel over all {jax.device_count()} devices)")
    if mesh is None or jax.device_count() == 1:
        return None
    return _batch_fits(parallel.make_mesh(mesh), batch_size, what)


def _batch_fits(built, batch_size: int, what: str, name: str = ""):
    """``built``, after checking that ``batch_size`` rows split over its ``data x fsdp``."""
    rows = parallel.batch_size_divisor(built)
    if batch_size % rows:
        of = f" of the {name} mesh" if name else ""
        raise ValueError(f"{what} {batch_size} is not divisible by data x fsdp = {rows}{of} "
                         f"(mesh {dict(built.shape)} over {built.devices.size} devices); change "
                         f"{what} or the mesh (mesh=None: one device)")
    return built


def split_mesh(mesh: MeshConfig | None, batch_size: int, rollout_devices: int, *,
               what: str = "data.batch_size"):
    """``(training mesh, rollout mesh)``: with ``rollout_devices`` the last that many devices
    form the rollout's mesh and the others the training one, each laid out by ``mesh`` (an
    axis of -1 takes what its device set leaves); without, ``(make_mesh(...), None)``. Raises
    when a mesh does not fit its devices or ``batch_size`` does not split over it."""
    if not rollout_devices:
        return make_mesh(mesh, batch_size, what=what), None
    n = jax.device_count()
    if mesh is None or jax.process_count() > 1 or not 0 < rollout_devices < n:
        raise ValueError(f"overlap.rollout_devices={rollout_devices} needs a mesh, one process "
                         f"and fewer devices than the {n} there are (the rest train)")
    devices = jax.devices()
    meshes = []
    for part, name in ((devices[:n - rollout_devices], "training"),
                       (devices[n - rollout_devices:], "rollout")):
        try:
            built = parallel.make_mesh(mesh, part)
        except ValueError as e:
            raise ValueError(f"the {name} mesh on {len(part)} devices (overlap.rollout_devices"
                             f"={rollout_devices} of {n}): {e}") from None
        meshes.append(_batch_fits(built, batch_size, what, name))
    return meshes[0], meshes[1]


def model_shardings(mesh, config: ModelConfig, params):
    """``params``' shardings by the family's rules (``parallel.param_shardings``); None
    without a mesh."""
    return None if mesh is None else parallel.param_shardings(config, params, mesh)


def place(tree, shardings):
    """``parallel.put`` when there are shardings, the tree unchanged otherwise."""
    return tree if shardings is None else parallel.put(tree, shardings)
