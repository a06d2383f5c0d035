"""Data: tokenizers and chat templates, TRL's dataset formats, JSONL / Parquet / ``datasets``
readers, encoders, batching/packing, iteration.

Nothing in ``rlhf_jax.ops`` or ``rlhf_jax.losses`` imports this package: the pure layer stays
free of tokenizers, Jinja and file I/O.
"""

from rlhf_jax.data._chat_template import CHATML_TEMPLATE
from rlhf_jax.data.batching import (
    pack_token_batch,
    pad_token_batch,
    preference_batch,
    prompt_batch,
)
from rlhf_jax.data.decode import decode_completions
from rlhf_jax.data.encode import (
    ON_OVERFLOW,
    Encoded,
    encode_preference,
    encode_prompts,
    encode_sft,
    encode_unpaired,
)
from rlhf_jax.data.formats import FORMATS, detect_format, extract_prompt, is_conversation
from rlhf_jax.data.iterator import BatchIterator
from rlhf_jax.data.jsonl import DataError, Dataset, load_jsonl, write_jsonl
from rlhf_jax.data.readers import load_dataset, load_hf_dataset, load_parquet
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.data.train_tokenizer import DEFAULT_SPECIAL_TOKENS, train_bpe_tokenizer

__all__ = [
    "BatchIterator",
    "CHATML_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "DataError",
    "Dataset",
    "Encoded",
    "FORMATS",
    "ON_OVERFLOW",
    "Tokenizer",
    "decode_completions",
    "detect_format",
    "encode_preference",
    "encode_prompts",
    "encode_sft",
    "encode_unpaired",
    "extract_prompt",
    "is_conversation",
    "load_dataset",
    "load_hf_dataset",
    "load_jsonl",
    "load_parquet",
    "pack_token_batch",
    "pad_token_batch",
    "preference_batch",
    "prompt_batch",
    "train_bpe_tokenizer",
    "write_jsonl",
]
