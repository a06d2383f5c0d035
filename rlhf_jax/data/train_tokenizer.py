"""Train a small byte-level BPE tokenizer (the tests' and the embedded experiments' tokenizers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax.data._chat_template import CHATML_TEMPLATE
from rlhf_jax.data.tokenizer import Tokenizer

DEFAULT_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                        min_frequency: int = 2, bos_token: str | None = "<|bos|>",
                        eos_token: str = "<|eos|>", pad_token: str | None = "<|pad|>",
                        chat_template: str | None = CHATML_TEMPLATE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (for tests and the toy experiments).

    Byte-level pre-tokenizer and decoder, no normaliser: every UTF-8 string round-trips,
    ``decode(encode(x)) == x``. Training is deterministic for the same inputs. The special
    tokens get the first ids, in order. With the default ChatML template, ``<|im_end|>`` is an
    EOS id too: it ends assistant turns, so the sampler must stop on it.
    """
    specials = list(special_tokens)
    needed = [t for t in (bos_token, eos_token, pad_token) if t is not None]
    if chat_template == CHATML_TEMPLATE:
        needed += ["<|im_start|>", "<|im_end|>"]
    missing = [t for t in needed if t not in specials]
    if missing:
        raise ValueError(f"special_tokens {specials} lack {missing}")
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size {vocab_size} < 256 bytes + {len(specials)} special tokens")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tid = backend.token_to_id
    eos_ids = [tid(eos_token)]
    if chat_template == CHATML_TEMPLATE and tid("<|im_end|>") not in eos_ids:
        eos_ids.append(tid("<|im_end|>"))
    return Tokenizer(
        tokenizer_json=backend.to_str(), eos_ids=tuple(eos_ids),
        pad_id=tid(pad_token) if pad_token is not None else eos_ids[0],
        bos_id=tid(bos_token) if bos_token is not None else None,
        chat_template=chat_template,
        add_bos_token=bos_token is not None, add_eos_token=False)
