"""What trains: every weight (full fine-tuning), or a LoRA adapter plus the output heads.

A LoRA run keeps the model's params in two trees (``models.lora``):

* ``base``: the frozen weights (quantised with QLoRA), placed once, never differentiated and
  never checkpointed: a resume rebuilds it from the same checkpoint or preset and seed;
* the *trainable* tree: the adapter (``lora_a``/``lora_b`` per adapted linear) and the heads a
  stage trains from scratch (``reward_head``, ``value_head``). This is ``TrainState.params``: the
  optimizer state, the gradients and the checkpoints cover it alone.

The loss sees ``combine(base, trainable)``; ``jax.grad`` with respect to the trainable tree then
computes no weight gradient for any frozen matrix (``tests/train/test_adapters.py`` reads the
compiled program). The reference of DPO, PPO and GRPO is the same ``base`` with the adapter
off (``Adapted.reference``): no second copy of the weights exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax.models import Model, model_for
from rlhf_jax.models.lora import (LoraConfig, LoraModel, adapter_shapes, combine,
                                  dequantize_base, init_adapter, lora_model, merge_adapter,
                                  quantize_base)

TRAINED_HEADS = ("reward_head", "value_head")
"""Top-level params a LoRA run trains in full next to the adapter (new, small, task-specific)."""


@dataclasses.dataclass(frozen=True)
class Adapted:
    """A LoRA model with its frozen base: ``model.apply(join(trainable))``."""

    model: LoraModel
    """The model with adapters in its graph (``models.lora.lora_model``)."""
    base: Any
    """The frozen params: everything but the adapter and the trained heads."""

    def join(self, trainable, *, dropout_key=None):
        """The full params of ``model``: ``base`` and ``trainable`` as one tree (no copy)."""
        return combine(self.base, trainable, dropout_key=dropout_key)

    @property
    def reference(self) -> tuple[Model, Callable[[Any], Any]]:
        """``(model, params_of(base))``: the adapter switched off, on the heads the base keeps
        (the trained ones are not in it). A plain base reads the base ``Model``; a quantised
        base runs the LoRA graph with a zero adapter (``B = 0``: every update term is 0)."""
        kept = tuple(h for h in self.model.config.heads if f"{h}_head" not in TRAINED_HEADS)
        config = self.model.config.replace(heads=kept or ("lm",))
        if self.model.lora.quantize_base is None:
            return model_for(config), lambda base: base
        model = lora_model(config, self.model.lora)
        shapes = adapter_shapes(model)

        def params_of(base):
            return combine(base, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

        return model, params_of

    def merged(self, trainable):
        """Plain base-model params with the adapter folded in (``W + s A B``) and the heads:
        the export form. A quantised base is dequantised first."""
        heads = {k: v for k, v in trainable.items() if k in TRAINED_HEADS}
        adapter = {k: v for k, v in trainable.items() if k not in TRAINED_HEADS}
        base = self.base
        if self.model.lora.quantize_base is not None:
            base = dequantize_base(base, self.model)
        return merge_adapter(base, adapter, self.model.lora) | heads

    def adapter(self, trainable):
        """The adapter alone (for a PEFT export)."""
        return {k: v for k, v in trainable.items() if k not in TRAINED_HEADS}


def adapt(model: Model, params, lora: LoraConfig, key, *, adapter=None) -> tuple[Adapted, Any]:
    """Split a loaded model for LoRA training: ``(Adapted, trainable)``. ``adapter``: start from
    these adapter weights (a PEFT import) instead of a fresh one (``B = 0``: outputs unchanged).
    """
    lm = lora_model(model, lora)
    heads = {k: v for k, v in params.items() if k in TRAINED_HEADS}
    base = {k: v for k, v in params.items() if k not in TRAINED_HEADS}
    if lora.quantize_base is not None:
        base = quantize_base(base, lm)
    fresh = init_adapter(lm, key) if adapter is None else adapter
    return Adapted(lm, base), combine(heads, fresh)


def lora_loss(loss_fn: Callable, adapted: Adapted, *, has_frozen: bool, train: bool):
    """``loss_fn`` (of full params) as a loss of the trainable tree, reading the base from the
    step's frozen arrays: ``(trainable, batch, key, frozen)`` where ``frozen`` is the base, or
    ``(base, task_frozen)`` when the task has its own (``has_frozen``). With ``train`` and LoRA
    dropout on, each micro-batch's key drives it."""
    model = adapted.model
    dropout = train and model.lora.dropout > 0

    def fn(trainable, batch, key, frozen):
        base, rest = (frozen if has_frozen else (frozen, None))
        key_d = jax.random.fold_in(key, 0x10A) if dropout else None
        params = combine(base, trainable, dropout_key=key_d)
        return loss_fn(params, batch, key) if not has_frozen else loss_fn(params, batch, key,
                                                                          rest)

    return fn


__all__ = ["TRAINED_HEADS", "Adapted", "adapt", "lora_loss"]
