"""A tiny chat world for command-line and format tests: a ChatML tokenizer saved with a tiny
Llama-style checkpoint (one directory, as a Hugging Face checkpoint ships), and one data file
per TRL format, standard and conversational."""

from __future__ import annotations

import json
import pathlib

import jax

from rlhf_jax.data import train_bpe_tokenizer
from rlhf_jax.models import get_preset, init_model, save_hf_checkpoint

COLORS = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
          ("sun", "yellow"), ("blood", "red"), ("sea", "blue"), ("leaf", "green")]


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def _rows():
    q = [(f"What color is the {t}?", f"The {t} is {c}.", f"The {t} is purple.")
         for t, c in COLORS]
    return {
        "text": [{"text": good} for _, good, _ in q],
        "prompt_completion": [{"prompt": p, "completion": " " + g} for p, g, _ in q],
        "prompt_completion_chat": [{"prompt": _user(p), "completion": _assistant(g)}
                                   for p, g, _ in q],
        "messages": [{"messages": _user(p) + _assistant(g)} for p, g, _ in q],
        "prompt": [{"prompt": p} for p, _, _ in q],
        "prompt_chat": [{"prompt": _user(p), "answer": g} for p, g, _ in q],
        "preference": [{"prompt": p, "chosen": " " + g, "rejected": " " + b} for p, g, b in q],
        "preference_chat": [{"prompt": _user(p), "chosen": _assistant(g),
                             "rejected": _assistant(b)} for p, g, b in q],
        "preference_implicit": [{"chosen": f"{p} {g}", "rejected": f"{p} {b}"} for p, g, b in q],
        "preference_implicit_chat": [{"chosen": _user(p) + _assistant(g),
                                      "rejected": _user(p) + _assistant(b)} for p, g, b in q],
        "unpaired_preference_chat": [{"prompt": _user(p), "completion": _assistant(r),
                                      "label": k % 2 == 0}
                                     for k, (p, g, b) in enumerate(q) for r in (g, b)],
    }


def make_chat_world(directory) -> dict[str, str]:
    """Write the checkpoint (``ckpt``: config, safetensors, tokenizer files) and one JSONL per
    key of ``_rows()`` under ``directory``; returns name -> path."""
    root = pathlib.Path(directory)
    rows = _rows()
    texts = [json.dumps(r) for rs in rows.values() for r in rs]
    tok = train_bpe_tokenizer(texts * 4, vocab_size=320)
    config = get_preset("toy-1m", vocab_size=tok.vocab_size, heads=("lm",), hidden_size=32,
                        intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                        max_position_embeddings=256)
    model, params = init_model(config, jax.random.PRNGKey(0))
    save_hf_checkpoint(str(root / "ckpt"), model.config, params)
    tok.save(str(root / "ckpt"))
    paths = {"ckpt": str(root / "ckpt")}
    for name, rs in rows.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rs))
        paths[name] = str(path)
    return paths
