"""Token log-probabilities and entropies from logits, plain and memory-chunked.

Plain forms take logits ``[B, T, V]``. The chunked forms take the final hidden states
``[B, T, D]`` and the unembedding matrix ``[D, V]`` and never build the ``[B, T, V]`` logits:
they scan over sequence chunks and, inside each, over vocabulary chunks with an online
log-sum-exp. A custom VJP recomputes each logit chunk in the backward pass and accumulates the
gradients in place, so the temporary memory is ``O(B * chunk_t * chunk_v)`` in value and gradient
instead of ``O(B * T * V)``, and no padded or transposed copy of ``hidden`` or ``unembed`` is made
(measured by ``benchmarks/logprob_memory.py``; asserted from XLA's memory analysis in the tests).

All arithmetic is float32 whatever the input dtype. log pi(y) = z_y - logsumexp(z): we gather
the target logit and subtract the log-sum-exp rather than materialising a full log-softmax.
Everything is computed on logits shifted by their maximum ``m`` (``z - m <= 0``), so the result
does not lose precision in proportion to ``|m|``: ``log pi(y) = (z_y - m) - log s`` and
``H = log s - E[z - m]`` with ``s = sum exp(z - m)``. Adding ``m`` back first (``m + log s``) would
round to the float32 spacing of ``m`` (6e-5 at logits near 1000).

Soft-capped logits (Gemma 2, Gemma Team 2024): with ``softcap=c`` the logits are
``z = c tanh((h . w) / c)`` before the temperature, as ``Model.logits`` computes them, and the
backward multiplies each ``dz`` by ``dz/d(h . w) = 1 - (z / c)^2``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

NEG_INF = -1e30
"""The "minus infinity" that masks logits and attention scores: finite on purpose.

With ``-inf``, a row masked everywhere (a padding query, an all-skipped vocabulary chunk) gives
``logsumexp = -inf`` and then ``-inf - (-inf) = nan`` in the softmax, the online log-sum-exp and
their gradients. ``-1e30`` still gives ``exp(NEG_INF - z) == 0`` in float32 next to any real
logit, while a fully masked row stays finite (a uniform softmax). Defined once, here, for
``ops`` (skipped vocabulary columns), the model's attention mask and the sampler's top-k/top-p.
"""


def _scaled(logits: jax.Array, temperature: float) -> jax.Array:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logits.astype(jnp.float32)
    return z if temperature == 1.0 else z / temperature


def _shifted(z: jax.Array) -> jax.Array:
    """``z - max_v z`` (a constant shift: no gradient through the max; an all ``-inf`` row is
    left unshifted)."""
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))  # [..., 1]
    return z - jnp.where(jnp.isfinite(m), m, 0.0)


def token_logprobs(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"], *, temperature: float = 1.0
) -> Float[Array, "B T"]:
    """``log softmax(logits / temperature)[..., targets]`` in float32.

    Formula: ``z_y - logsumexp_v z_v`` with ``z = logits / temperature``.

    >>> lp = token_logprobs(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
    >>> round(float(lp[0, 0]), 4)  # log(1/4)
    -1.3863
    """
    chex.assert_shape(targets, jnp.shape(logits)[:-1])  # take_along_axis would broadcast
    z = _shifted(_scaled(logits, temperature))  # [B, T, V]; z - max
    z_y = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return z_y - jax.nn.logsumexp(z, axis=-1)


def entropy_from_logits(
    logits: Float[Array, "B T V"], *, temperature: float = 1.0
) -> Float[Array, "B T"]:
    """Entropy of ``softmax(logits / temperature)`` per position, in nats.

    Formula: ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` with ``0 * (-inf) = 0``, so logits
    masked to ``-inf`` (top-k, banned tokens) give a finite entropy and finite gradients. Both
    terms are evaluated on ``z - max z`` (``H`` is shift-invariant), which keeps full float32
    precision at large logits.
    """
    z = _shifted(_scaled(logits, temperature))
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jax.nn.softmax(z, axis=-1)
    live = p > 0
    pz = jnp.where(live, p * jnp.where(live, z, 0.0), 0.0)  # double where: no NaN gradient
    return lse - jnp.sum(pz, axis=-1)


def _span(n: int, chunk: int, i: jax.Array):
    """Chunk ``i`` of ``ceil(n / chunk)``: the last is shifted left to fit inside ``n``.

    Returns ``(start, new)``: the slice start and a ``[chunk]`` mask of positions not covered by
    an earlier chunk (so chunk sizes need not divide ``n`` and nothing is counted twice).
    """
    off = i * chunk
    start = jnp.minimum(off, n - chunk)
    return start, (start + jnp.arange(chunk)) >= off


def _cap(z: jax.Array, softcap: float | None) -> jax.Array:
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def _logits(h: jax.Array, w: jax.Array, temperature: float, softcap: float | None) -> jax.Array:
    z = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)  # [B, t, v]
    return _cap(z.astype(jnp.float32), softcap) / temperature


def _chunk_stats(h, w, chunk_v: int, temperature: float, softcap: float | None):
    """Online ``(m, s, u) = (max z, sum exp(z - m), sum exp(z - m) (z - m))`` over vocabulary
    chunks of ``h`` [B, t, D]. When the max moves from ``m`` to ``m'`` both sums are rescaled by
    ``exp(m - m')`` and ``u`` also gains ``s (m - m')`` (its terms are relative to the max)."""
    v = w.shape[1]

    def body(i, carry):
        m, s, u = carry  # [B, t] each
        start, new = _span(v, chunk_v, i)
        z = _logits(h, jax.lax.dynamic_slice_in_dim(w, start, chunk_v, axis=1), temperature,
                    softcap)
        z = jnp.where(new, z, NEG_INF)  # [B, t, cv]
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        zc = z - m_new[..., None]  # [B, t, cv]; <= 0
        e = jnp.exp(zc)
        ez = jnp.where(new, e * zc, 0.0)
        u = scale * (u + s * (m - m_new))  # s is 0 while m is still NEG_INF: no overflow
        return m_new, s * scale + e.sum(-1), u + ez.sum(-1)

    shape = h.shape[:2]
    init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape), jnp.zeros(shape))
    return jax.lax.fori_loop(0, -(-v // chunk_v), body, init)


def _forward(hidden, unembed, targets, temperature, chunk_t, chunk_v, softcap):
    """Per position: the max ``m``, ``log s = logsumexp(z - m)``, ``ezc = E_softmax(z)[z - m]``
    and the target logit relative to the max, ``z_y - m``."""
    b, t, _ = hidden.shape

    def body(i, outs):
        start, _ = _span(t, chunk_t, i)
        h = jax.lax.dynamic_slice_in_dim(hidden, start, chunk_t, axis=1)  # [B, ct, D]
        y = jax.lax.dynamic_slice_in_dim(targets, start, chunk_t, axis=1)  # [B, ct]
        m, s, u = _chunk_stats(h, unembed, chunk_v, temperature, softcap)
        w_y = jnp.take(unembed, y, axis=1)  # [D, B, ct]
        z_y = jnp.einsum("btd,dbt->bt", h, w_y, preferred_element_type=jnp.float32)
        z_y = _cap(z_y.astype(jnp.float32), softcap) / temperature
        new = (m, jnp.log(s), u / s, z_y - m)
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, n, start, axis=1)
                     for o, n in zip(outs, new))

    zeros = jnp.zeros((b, t), jnp.float32)
    return jax.lax.fori_loop(0, -(-t // chunk_t), body, (zeros,) * 4)


# ``mode``: which outputs are differentiated ("logprobs", "entropy" or "both"); the forward pass
# yields both from one sweep over the vocabulary either way.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _chunked(hidden, unembed, targets, mode, temperature, chunk_t, chunk_v, softcap):
    _, log_s, ezc, zc_y = _forward(hidden, unembed, targets, temperature, chunk_t, chunk_v,
                                   softcap)
    return zc_y - log_s, log_s - ezc


def _chunked_fwd(hidden, unembed, targets, mode, temperature, chunk_t, chunk_v, softcap):
    m, log_s, ezc, zc_y = _forward(hidden, unembed, targets, temperature, chunk_t, chunk_v,
                                   softcap)
    return (zc_y - log_s, log_s - ezc), (hidden, unembed, targets, m, log_s, ezc)


def _chunked_bwd(mode, temperature, chunk_t, chunk_v, softcap, res, gs):
    """Recompute each logit chunk; ``dz = g_lp (onehot(y) - p) - g_H p (z - E[z])``, over T (a
    term is skipped when ``mode`` says its output is not differentiated), times
    ``1 - (z / c)^2`` with a soft-cap ``c``."""
    hidden, unembed, targets, m, log_s, ezc = res
    (b, t, d), v = hidden.shape, unembed.shape[1]
    use_lp, use_ent = mode in ("logprobs", "both"), mode in ("entropy", "both")
    g_lp, g_ent = (x.astype(jnp.float32) for x in gs)

    def time_body(i, carry):
        dh, dw = carry  # [B, T, D], [D, V] float32
        start, new_t = _span(t, chunk_t, i)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start,
                               slice_size=chunk_t, axis=1)
        h, y, m_c, log_s_c, ezc_c = sl(hidden), sl(targets), sl(m), sl(log_s), sl(ezc)
        gl_c = jnp.where(new_t, sl(g_lp), 0.0) / temperature  # [B, ct]; overlap counted once
        ge_c = jnp.where(new_t, sl(g_ent), 0.0) / temperature

        def vocab_body(j, inner):
            dh_c, dw = inner
            vs, new_v = _span(v, chunk_v, j)
            w = jax.lax.dynamic_slice_in_dim(unembed, vs, chunk_v, axis=1)  # [D, cv]
            z = _logits(h, w, temperature, softcap)  # [B, ct, cv]
            zc = z - m_c[..., None]  # z - max
            p = jnp.where(new_v, jnp.exp(zc - log_s_c[..., None]), 0.0)
            dz = jnp.zeros_like(p)
            if use_lp:
                hit = (vs + jnp.arange(chunk_v) == y[..., None]) & new_v
                dz = gl_c[..., None] * (hit.astype(jnp.float32) - p)
            if use_ent:
                dz = dz - ge_c[..., None] * p * (zc - ezc_c[..., None])  # z - E[z]
            if softcap is not None:  # through the cap: d(c tanh(x / c)) = 1 - tanh^2
                dz = dz * (1.0 - jnp.square(z * temperature / softcap))
            dh_c = dh_c + jnp.einsum("btv,dv->btd", dz, w, preferred_element_type=jnp.float32)
            dw_c = jnp.einsum("btd,btv->dv", h, dz, preferred_element_type=jnp.float32)
            old = jax.lax.dynamic_slice_in_dim(dw, vs, chunk_v, axis=1)
            return dh_c, jax.lax.dynamic_update_slice_in_dim(dw, old + dw_c, vs, axis=1)

        dh_c, dw = jax.lax.fori_loop(0, -(-v // chunk_v), vocab_body,
                                     (jnp.zeros((b, chunk_t, d), jnp.float32), dw))
        old = jax.lax.dynamic_slice_in_dim(dh, start, chunk_t, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(dh, old + dh_c, start, axis=1), dw

    init = (jnp.zeros((b, t, d), jnp.float32), jnp.zeros((d, v), jnp.float32))
    dh, dw = jax.lax.fori_loop(0, -(-t // chunk_t), time_body, init)
    dy = np.zeros(targets.shape, jax.dtypes.float0)
    return dh.astype(hidden.dtype), dw.astype(unembed.dtype), dy


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _check_chunks(hidden, unembed, temperature, chunk_t, chunk_v, targets=None,
                  softcap=None) -> tuple[int, int]:
    """Shapes (``[B, T, D]``, ``[D, V]``, targets ``[B, T]``), temperature and chunk sizes, checked
    here rather than deep inside the scans."""
    chex.assert_rank([hidden, unembed], [3, 2])
    chex.assert_axis_dimension(unembed, 0, hidden.shape[-1])
    if targets is not None:
        chex.assert_shape(targets, hidden.shape[:2])
    _scaled(jnp.zeros(()), temperature)  # validates temperature
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if chunk_t < 1 or chunk_v < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_t={chunk_t}, chunk_v={chunk_v}")
    return min(chunk_t, hidden.shape[1]), min(chunk_v, unembed.shape[1])


def chunked_token_logprobs(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "D V"],
    targets: Int[Array, "B T"],
    *,
    temperature: float = 1.0,
    chunk_t: int = 128,
    chunk_v: int = 8192,
    softcap: float | None = None,
) -> Float[Array, "B T"]:
    """``token_logprobs(softcap(hidden @ unembed), targets)`` without materialising
    ``[B, T, V]``.

    Formula as in ``token_logprobs``; the target logit is ``hidden . unembed[:, y]`` and the
    log-sum-exp is accumulated online over vocabulary chunks (Milakov & Gimelshein, 2018).
    Chunk sizes need not divide ``T`` or ``V``. ``softcap=c``: logits ``c tanh(z / c)``, before
    the temperature (Gemma 2's final-logit cap; None: none).
    """
    ct, cv = _check_chunks(hidden, unembed, temperature, chunk_t, chunk_v, targets, softcap)
    return _chunked(hidden, unembed, targets.astype(jnp.int32), "logprobs", float(temperature),
                    ct, cv, softcap)[0]


def chunked_entropy(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "D V"],
    *,
    temperature: float = 1.0,
    chunk_t: int = 128,
    chunk_v: int = 8192,
    softcap: float | None = None,
) -> Float[Array, "B T"]:
    """``entropy_from_logits(softcap(hidden @ unembed))`` without materialising ``[B, T, V]``.

    With ``m`` the running max, ``s = sum exp(z - m)`` and ``u = sum exp(z - m) (z - m)``:
    ``H = log s - u / s`` (no ``m`` added and subtracted back: full precision at large logits).
    """
    ct, cv = _check_chunks(hidden, unembed, temperature, chunk_t, chunk_v, None, softcap)
    targets = jnp.zeros(hidden.shape[:2], jnp.int32)  # unused by the entropy
    return _chunked(hidden, unembed, targets, "entropy", float(temperature), ct, cv, softcap)[1]


def chunked_logprobs_and_entropy(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "D V"],
    targets: Int[Array, "B T"],
    *,
    temperature: float = 1.0,
    chunk_t: int = 128,
    chunk_v: int = 8192,
    softcap: float | None = None,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """``(chunked_token_logprobs(...), chunked_entropy(...))`` from one sweep over the
    vocabulary (one logit matmul instead of two, forward and backward): the online statistics
    ``m``, ``s = sum exp(z - m)``, ``u = sum exp(z - m) (z - m)`` give
    ``log pi(y) = (z_y - m) - log s`` and ``H = log s - u / s``. The gradient sums both terms'
    ``dz`` in one pass.
    """
    ct, cv = _check_chunks(hidden, unembed, temperature, chunk_t, chunk_v, targets, softcap)
    return _chunked(hidden, unembed, targets.astype(jnp.int32), "both", float(temperature),
                    ct, cv, softcap)
