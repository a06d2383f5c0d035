"""Build the tiny Hugging Face checkpoints and reference outputs in ``tests/fixtures/hf/``.

Run with an interpreter that has torch and transformers (not needed by the tests themselves)::

    .venv/bin/python tools/make_hf_fixtures.py [FAMILY ...]

With family names, only those fixtures are rebuilt and the others are left byte for byte (each
family's model is seeded on its own, so building one never changes another). The committed
llama/qwen2/mistral references were computed with an earlier torch: rebuilding them with torch
2.13 gives the same weights and greedy tokens but reference logits that differ by ~1e-6, so name
the families you mean to (re)build.

Design choices, and why:
- Each family is a random model built from a config with ``torch.manual_seed(0)``; nothing is
  downloaded. The families cover the three import paths: Llama with ``llama3`` rope scaling and
  tied embeddings, Qwen2 with its implicit q/k/v biases (untied, saved as several shards so the
  ``model.safetensors.index.json`` path is exercised), Mistral with ``sliding_window=6``, shorter
  than the 12-token test batch and the 40-token greedy run, so the window changes the outputs
  (transformers 5 applies it in eager attention through ``create_sliding_window_causal_mask``).
- Qwen3: q/k norms and ``head_dim=32`` (not 64 / 4), tied. Phi-3: the fused ``qkv_proj`` and
  ``gate_up_proj`` tensors, and its one window (6) on every layer; seed 1, as seed 0 gives a
  near tie in its greedy run. Gemma 2: window 6 on layer 0 only (``layer_types``), small soft-caps
  (attention 1.0, final logits 2.0: the random logits reach them, so the caps change the
  outputs), ``query_pre_attn_scalar=24`` (not ``head_dim``). Gemma 3: q/k norms, window 6 on
  layer 0, local RoPE base 10^4 against a global 10^6 with linear scaling (factor 8), no caps.
- Qwen3-MoE: 4 experts (width 32), top-2, ``norm_topk_prob=False`` (the weights are not
  renormalised; Mixtral covers renormalisation), layer 0 dense by ``mlp_only_layers`` and layer 1
  sparse, ``head_dim=32``, untied. Mixtral: 4 experts (width 32), top-2, every layer sparse,
  ``sliding_window`` null as in Mixtral-8x7B. For these the smallest gap between the k-th and
  (k+1)-th router logit over every token of both references is printed too: a near tie there
  would route differently under float32 rounding.
- Weights are rounded to bfloat16 and stored as bfloat16 to keep the fixtures small; the
  references are computed in float32 from exactly those rounded weights (bf16 -> f32 is exact),
  so the tests load with ``dtype="float32"`` and compare at 1e-4.
- Positions for the left-padded row are ``cumsum(mask) - 1`` (what ``generate`` uses); a plain
  forward call would otherwise give padding positions to real tokens.
- The greedy reference is ``generate(do_sample=False)`` with the KV cache and EOS disabled, so
  exactly 32 tokens come out. The smallest top-1/top-2 logit gap is printed: a near tie would
  make exact token parity fragile.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "qwen2": (transformers.Qwen2Config, dict(
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mistral": (transformers.MistralConfig, dict(
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "qwen3": (transformers.Qwen3Config, dict(
        rms_norm_eps=1e-6, tie_word_embeddings=True, head_dim=32, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "phi3": (transformers.Phi3Config, dict(
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gemma2": (transformers.Gemma2Config, dict(
        rms_norm_eps=1e-6, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        rms_norm_eps=1e-6, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=None,
        attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=32, use_sliding_window=False,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
        mlp_only_layers=[0], decoder_sparse_step=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral": (transformers.MixtralConfig, dict(
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None, num_local_experts=4,
        num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
MOE_WIDTH = {"mixtral": 32}  # Mixtral's experts are ``intermediate_size`` wide
SHARDED = {"qwen2": "100KB"}
SEEDS = {"phi3": 1}  # seed 0 gives a near tie (top-2 gap 2e-4) in phi3's greedy run
NEW_TOKENS = 32


def build(family: str) -> transformers.PreTrainedModel:
    config_cls, extra = FAMILIES[family]
    config = config_cls(**dict(COMMON, intermediate_size=MOE_WIDTH.get(family, 128)), **extra)
    torch.manual_seed(SEEDS.get(family, 0))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so logits are not all near zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def inputs() -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(0)
    ids = r.integers(0, 256, size=(2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[1, :4] = 0  # row 1 is left-padded
    ids[1, :4] = 0
    return ids, mask


def router_gap(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Smallest k-th minus (k+1)-th router logit over the real tokens (inf for dense models)."""
    k = getattr(model.config, "num_experts_per_tok", None)
    if k is None:
        return float("inf")
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    real = torch.ones(ids.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    top = torch.stack([torch.topk(z, k + 1, dim=-1).values for z in out.router_logits])
    return float((top[..., k - 1] - top[..., k])[:, real].min())


def main(families: list[str]) -> None:
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    for family in families or FAMILIES:
        out = ROOT / family
        shutil.rmtree(out, ignore_errors=True)
        model = build(family)
        ids, mask = inputs()
        pos = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(pos)).logits.numpy().astype(np.float32)
            prompt = torch.tensor(np.random.default_rng(1).integers(0, 256, size=(1, 8)))
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 eos_token_id=None, pad_token_id=0, use_cache=True)
            new = gen[:, prompt.shape[1]:]
            # Margin of each greedy choice, recomputed with a full (cache-free) forward.
            full = model(gen).logits[0, prompt.shape[1] - 1:-1]
            top2 = torch.topk(full, 2, dim=-1).values
            gap = float((top2[:, 0] - top2[:, 1]).min())
            agree = bool((full.argmax(-1) == new[0]).all())
            routing = min(router_gap(model, torch.tensor(ids), torch.tensor(mask)),
                          router_gap(model, gen))
        model.to(torch.bfloat16).save_pretrained(
            out, safe_serialization=True, max_shard_size=SHARDED.get(family, "50GB"))
        np.savez(out / "reference.npz", input_ids=ids.astype(np.int32),
                 attention_mask=mask.astype(np.int32), logits=logits,
                 prompt=prompt.numpy().astype(np.int32), greedy=new.numpy().astype(np.int32))
        (out / "generation_config.json").unlink(missing_ok=True)
        size = sum(p.stat().st_size for p in out.iterdir())
        files = sorted(p.name for p in out.iterdir())
        print(f"{family}: {size / 1024:.0f} KiB {files}; greedy min top-2 gap {gap:.4f}; "
              f"cache-free argmax agrees with generate: {agree}; router min k/k+1 gap "
              f"{routing:.4f}")
        print(json.dumps({k: v for k, v in json.loads((out / 'config.json').read_text()).items()
                          if 'rope' in k or 'slid' in k or 'tie' in k or k == 'dtype'}))


if __name__ == "__main__":
    main(sys.argv[1:])
