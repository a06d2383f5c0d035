"""rlhf_jax: JAX-native post-training with pure, sharded loss functions.

Import what you need: ``rlhf_jax.ops`` and ``rlhf_jax.losses`` are pure array code and load
without any model, optimizer or checkpointing library.
"""

__version__ = "0.1.0"
