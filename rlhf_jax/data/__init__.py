"""Data: tokenizers and chat templates (dataset readers and batching live beside them).

Nothing in ``rlhf_jax.ops`` or ``rlhf_jax.losses`` imports this package: the pure layer stays
free of tokenizers, Jinja and file I/O.
"""

from rlhf_jax.data._chat_template import CHATML_TEMPLATE
from rlhf_jax.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, train_bpe_tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "DEFAULT_SPECIAL_TOKENS",
    "Tokenizer",
    "train_bpe_tokenizer",
]
