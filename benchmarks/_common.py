"""Shared benchmark plumbing: the optional torch stack, one shared checkpoint, timing, output.

Both systems always run on the *same* checkpoint: when transformers is installed it builds a
random Llama with a fixed seed and saves it as safetensors, and we import that directory; without
it, only our side runs, on the same architecture initialised by us.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import jax

from rlhf_jax.models import ModelConfig, init_model

BENCH_LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_layers=8,
                   num_heads=8, num_kv_heads=4, max_position_embeddings=2048)
REAL_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                 num_heads=9, num_kv_heads=3, max_position_embeddings=2048, tie_embeddings=True)
"""The 135M-class shape of issues 16 and 18 (a SmolLM-135M-like Llama, tied embeddings)."""


def torch_stack():
    """``(torch, transformers)`` if both import, else ``(None, None)``."""
    try:
        import torch
        import transformers
    except ImportError:
        return None, None
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, transformers


def shared_checkpoint(arch: dict = BENCH_LLAMA, seed: int = 0):
    """Returns ``(model, params, hf_model_or_None)`` built from one checkpoint (``arch``: the
    ``ModelConfig`` fields of a Llama; untied unless it says ``tie_embeddings``)."""
    torch, transformers = torch_stack()
    tied = arch.get("tie_embeddings", False)
    if torch is None:
        cfg = ModelConfig(family="llama", **{"tie_embeddings": False} | arch)
        model, params = init_model(cfg, jax.random.PRNGKey(seed))
        return model, params, None
    from rlhf_jax.models.hf import load_hf_checkpoint

    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
        max_position_embeddings=arch["max_position_embeddings"], tie_word_embeddings=tied)
    hf_model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d, safe_serialization=True)
        cfg, params = load_hf_checkpoint(d)
    return _model_for(cfg), params, hf_model


def _model_for(cfg: ModelConfig):
    """The pure ``Model`` for ``cfg`` without allocating params (graph definition only)."""
    from flax import nnx

    from rlhf_jax.models.transformer import Model, Transformer

    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return Model(cfg, graphdef)


def timed(fn, *, repeats: int = 3) -> tuple[float, float]:
    """``(first_call_seconds, median_seconds_of_the_next_repeats)``; fn must block."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)


def program_peak_bytes(compiled) -> int:
    """What a compiled program needs at once by XLA's buffer assignment
    (``compiled.memory_analysis()``): ``argument + output - alias + temp`` bytes, its inputs
    included and donated inputs counted once."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def emit(record: dict) -> dict:
    record.setdefault("backend", jax.default_backend())
    record.setdefault("devices", jax.device_count())
    record.setdefault("cpu_count", os.cpu_count())
    print(json.dumps(record))
    return record
