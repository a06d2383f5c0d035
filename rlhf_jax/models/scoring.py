"""Pure scoring functions of a model: teacher-forced log-probs, completion log-probs, entropy,
values and sequence rewards.

These are the functions every trainer shares, written once so that the numbers the sampler
reports, the ones the trainer recomputes, and the reference model's are computed the same way.
Log-probs and entropy use the chunked forms (``ops.chunked_token_logprobs``): the ``[B, T, V]``
logits are never materialised, whatever the vocabulary. They get the model's final-logit
soft-cap (Gemma 2), so they equal ``log_softmax(Model.logits(...))``.

Rollout layout: ``prompt [B, P]`` is left-padded (``sampling.pad_prompts``), ``completion
[B, C]`` is right-padded with ``completion_mask`` 1 up to and including the EOS. The model reads
``concat(prompt, completion)``; the hidden state at ``P - 1 + t`` predicts completion token
``t``, and the value head is read at that same position (the state in which token ``t`` is
chosen).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from rlhf_jax.models.transformer import Model, moe_aux_loss
from rlhf_jax.ops.logprobs import chunked_logprobs_and_entropy, chunked_token_logprobs
from rlhf_jax.types import TokenBatch


class CompletionScores(NamedTuple):
    """Per completion token: log-prob, and optionally entropy and value (0 where masked)."""

    logprobs: Float[Array, "B C"]
    entropy: Float[Array, "B C"] | None
    values: Float[Array, "B C"] | None


def token_batch_logprobs(model: Model, params, batch: TokenBatch, *, temperature: float = 1.0,
                         chunk_t: int = 128, chunk_v: int = 8192, with_aux: bool = False):
    """``out[b, t] = log pi(tokens[b, t] | tokens[b, <t])`` for ``t >= 1``; ``out[:, 0] = 0``.

    Aligned with ``batch.tokens`` so ``batch.loss_mask`` applies directly (it is 0 at ``t = 0``
    by the ``TokenBatch`` convention). Packed rows use ``segment_ids``/``positions``.
    ``with_aux``: return ``(out, moe_aux_loss)``, the mixture-of-experts load-balancing term of
    the same forward pass (0 for a dense model; ``transformer.moe_aux_loss``).
    """
    output = model.apply(params, batch.tokens, attention_mask=batch.attention_mask,
                         positions=batch.positions, segment_ids=batch.segment_ids)
    hidden = output.hidden
    lp = chunked_token_logprobs(hidden[:, :-1], model.unembedding(params), batch.tokens[:, 1:],
                                temperature=temperature, chunk_t=chunk_t, chunk_v=chunk_v,
                                softcap=model.config.final_logit_softcap)
    lp = jnp.pad(lp, ((0, 0), (1, 0)))
    if with_aux:
        return lp, moe_aux_loss(model, output, batch.attention_mask)
    return lp


def token_batch_logits(model: Model, params, batch: TokenBatch) -> Float[Array, "B T V"]:
    """Full next-token logits ``[B, T, V]`` (float32) of a ``TokenBatch`` (for distillation)."""
    hidden = model.apply(params, batch.tokens, attention_mask=batch.attention_mask,
                         positions=batch.positions, segment_ids=batch.segment_ids).hidden
    return model.logits(params, hidden)


def sequence_logprob_sums(model: Model, params, batch: TokenBatch) -> tuple[
        Float[Array, " B"], Float[Array, " B"]]:
    """``(sum of target log-probs, number of targets)`` per row: DPO's ``log pi(y | x)``."""
    lp = token_batch_logprobs(model, params, batch)
    m = batch.loss_mask.astype(jnp.float32)
    return jnp.sum(lp * m, axis=-1), jnp.sum(m, axis=-1)


def _rollout_hidden(model, params, prompt, prompt_mask, completion, completion_mask):
    tokens = jnp.concatenate([prompt, completion], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask.astype(bool)], axis=1)
    return model.apply(params, tokens, attention_mask=mask).hidden, mask


def score_completions(
    model: Model,
    params,
    prompt: Int[Array, "B P"],
    prompt_mask: Bool[Array, "B P"],
    completion: Int[Array, "B C"],
    completion_mask: Bool[Array, "B C"],
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    values: bool = False,
    chunk_t: int = 128,
    chunk_v: int = 8192,
) -> CompletionScores:
    """Log-probs (and entropy / values) of ``completion`` given ``prompt``, as the sampler
    computed them: ``log softmax(logits / temperature)[token]``, 0 where the mask is 0."""
    hidden, _ = _rollout_hidden(model, params, prompt, prompt_mask, completion, completion_mask)
    p, c = prompt.shape[1], completion.shape[1]
    h = hidden[:, p - 1:p + c - 1]
    w = model.unembedding(params)
    m = completion_mask.astype(bool)
    chunks = dict(temperature=temperature, chunk_t=chunk_t, chunk_v=chunk_v,
                  softcap=model.config.final_logit_softcap)
    ent = None
    if entropy:  # both from one sweep over the vocabulary
        lp, ent = chunked_logprobs_and_entropy(h, w, completion, **chunks)
        ent = jnp.where(m, ent, 0.0)
    else:
        lp = chunked_token_logprobs(h, w, completion, **chunks)
    val = jnp.where(m, model.values(params, h), 0.0) if values else None
    return CompletionScores(jnp.where(m, lp, 0.0), ent, val)


def completion_values(model: Model, params, prompt, prompt_mask, completion, completion_mask
                      ) -> Float[Array, "B C"]:
    """Value-head estimates at each completion token's decision state (separate critic)."""
    hidden, _ = _rollout_hidden(model, params, prompt, prompt_mask, completion, completion_mask)
    p, c = prompt.shape[1], completion.shape[1]
    return jnp.where(completion_mask.astype(bool),
                     model.values(params, hidden[:, p - 1:p + c - 1]), 0.0)


def sequence_rewards(model: Model, params, prompt, prompt_mask, completion, completion_mask
                     ) -> Float[Array, " B"]:
    """Reward-head score of prompt + completion, read at the last real token (the EOS, or the
    last token of a truncated completion)."""
    hidden, mask = _rollout_hidden(model, params, prompt, prompt_mask, completion,
                                   completion_mask)
    return model.rewards(params, hidden, mask)


def token_batch_rewards(model: Model, params, batch: TokenBatch) -> Float[Array, " B"]:
    """Reward-head score of each (right-padded) ``TokenBatch`` row at its last real token."""
    hidden = model.apply(params, batch.tokens, attention_mask=batch.attention_mask,
                         positions=batch.positions).hidden
    return model.rewards(params, hidden, batch.attention_mask.astype(bool))


__all__ = ["CompletionScores", "token_batch_logprobs", "token_batch_logits",
           "sequence_logprob_sums", "score_completions", "completion_values",
           "sequence_rewards", "token_batch_rewards"]
