"""Token log-probabilities and entropies from logits, plain and memory-chunked.

Plain forms take logits ``[B, T, V]``. The chunked forms take the final hidden states
``[B, T, D]`` and the unembedding matrix ``[D, V]`` and never build the ``[B, T, V]`` logits:
they scan over sequence chunks and, inside each, over vocabulary chunks with an online
log-sum-exp, re-materialising each chunk in the backward pass. Peak memory is
``O(B * chunk_t * chunk_v)`` instead of ``O(B * T * V)`` (measured by
``benchmarks/logprob_memory.py`` and asserted from XLA's memory analysis in the tests).

All arithmetic is float32 whatever the input dtype. log pi(y) = z_y - logsumexp(z): we gather
the target logit and subtract the log-sum-exp rather than materialising a full log-softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

_NEG = -1e30  # finite "minus infinity" for padded vocabulary columns (keeps exp and grads finite)


def _scaled(logits: jax.Array, temperature: float) -> jax.Array:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.astype(jnp.float32)
    return z if temperature == 1.0 else z / temperature


def token_logprobs(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"], *, temperature: float = 1.0
) -> Float[Array, "B T"]:
    """``log softmax(logits / temperature)[..., targets]`` in float32.

    Formula: ``z_y - logsumexp_v z_v`` with ``z = logits / temperature``.

    >>> lp = token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
    >>> round(float(lp[0, 0]), 4)  # log(1/4)
    -1.3863
    """
    z = _scaled(logits, temperature)  # [B, T, V]
    z_y = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return z_y - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(
    logits: Float[Array, "B T V"], *, temperature: float = 1.0
) -> Float[Array, "B T"]:
    """Entropy of ``softmax(logits / temperature)`` per position, in nats.

    Formula: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``.
    """
    z = _scaled(logits, temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    return lse - jnp.sum(p * z, axis=-1)


def _pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _online_stats(h: jax.Array, w: jax.Array, chunk_v: int, temperature: float):
    """Online (max, sum exp, sum exp*z) over vocabulary chunks for hidden chunk ``h`` [B, t, D]."""
    d, v = w.shape
    wp = _pad_axis(w, 1, chunk_v)  # [D, Vp]
    n_chunks = wp.shape[1] // chunk_v
    w_chunks = wp.reshape(d, n_chunks, chunk_v).transpose(1, 0, 2)  # [C, D, chunk_v]
    offsets = jnp.arange(n_chunks) * chunk_v

    def body(carry, xs):
        m, s, t = carry  # [B, t] running max, sum exp(z - m), sum exp(z - m) * z
        wc, off = xs
        z = jnp.einsum("btd,dv->btv", h, wc, preferred_element_type=jnp.float32)
        z = z.astype(jnp.float32) / temperature
        valid = (off + jnp.arange(chunk_v)) < v
        z = jnp.where(valid, z, _NEG)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        ez = jnp.where(valid, e * z, 0.0)
        return (m_new, s * scale + e.sum(-1), t * scale + ez.sum(-1)), None

    b, tt = h.shape[:2]
    init = (jnp.full((b, tt), _NEG, jnp.float32), jnp.zeros((b, tt)), jnp.zeros((b, tt)))
    (m, s, t), _ = jax.lax.scan(jax.checkpoint(body), init, (w_chunks, offsets))
    return m, s, t


def _chunk_over_time(fn, h: jax.Array, extra: jax.Array | None, chunk_t: int) -> jax.Array:
    b, t = h.shape[:2]
    hp = _pad_axis(h, 1, chunk_t)
    n = hp.shape[1] // chunk_t
    h_chunks = hp.reshape(b, n, chunk_t, h.shape[-1]).transpose(1, 0, 2, 3)  # [C, B, t, D]
    if extra is None:
        xs = h_chunks
        out = jax.lax.map(jax.checkpoint(fn), xs)
    else:
        e_chunks = _pad_axis(extra, 1, chunk_t).reshape(b, n, chunk_t).transpose(1, 0, 2)
        out = jax.lax.map(jax.checkpoint(lambda a: fn(*a)), (h_chunks, e_chunks))
    return out.transpose(1, 0, 2).reshape(b, n * chunk_t)[:, :t]  # [B, T]


def chunked_token_logprobs(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "D V"],
    targets: Int[Array, "B T"],
    *,
    temperature: float = 1.0,
    chunk_t: int = 128,
    chunk_v: int = 8192,
) -> Float[Array, "B T"]:
    """``token_logprobs(hidden @ unembed, targets)`` without materialising ``[B, T, V]``.

    Formula as in ``token_logprobs``; the target logit is ``hidden . unembed[:, y]`` and the
    log-sum-exp is accumulated online over vocabulary chunks (Milakov & Gimelshein, 2018).
    Chunk sizes need not divide ``T`` or ``V``.
    """
    _scaled(jnp.zeros(()), temperature)  # validates temperature

    def per_chunk(h, y):  # h [B, t, D], y [B, t]
        m, s, _ = _online_stats(h, unembed, chunk_v, temperature)
        w_y = jnp.take(unembed, y.astype(jnp.int32), axis=1)  # [D, B, t]
        z_y = jnp.einsum("btd,dbt->bt", h, w_y, preferred_element_type=jnp.float32)
        return z_y.astype(jnp.float32) / temperature - (m + jnp.log(s))

    return _chunk_over_time(per_chunk, hidden, targets, chunk_t)


def chunked_entropy(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "D V"],
    *,
    temperature: float = 1.0,
    chunk_t: int = 128,
    chunk_v: int = 8192,
) -> Float[Array, "B T"]:
    """``entropy_from_logits(hidden @ unembed)`` without materialising ``[B, T, V]``.

    With ``m`` the running max, ``s = sum exp(z - m)`` and ``u = sum exp(z - m) z``:
    ``H = m + log s - u / s``.
    """
    _scaled(jnp.zeros(()), temperature)

    def per_chunk(h):
        m, s, u = _online_stats(h, unembed, chunk_v, temperature)
        return m + jnp.log(s) - u / s

    return _chunk_over_time(per_chunk, hidden, None, chunk_t)
