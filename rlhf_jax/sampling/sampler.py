"""KV-cached generation compiled as one function: prefill, then a ``lax.while_loop`` decode.

Design choices and why:

* One jitted function per (batch, prompt bucket, ``max_new_tokens``): prompts are left-padded to
  a few bucket lengths (``pad_prompts``) so a run compiles a handful of shapes.
* The loop exits as soon as every row has emitted an EOS, so short completions cost short time.
* Each row draws its token at step ``t`` with ``fold_in(fold_in(key, row), t)``: a row's sample
  does not depend on which other rows share its batch, and resuming at a step reproduces it.
* The returned log-probs are those of the sampled tokens under the *temperature-scaled, unfiltered*
  policy, ``log softmax(logits / temperature)[token]``: exactly what the trainer recomputes with
  ``ops.token_logprobs(..., temperature=...)`` (top-k/top-p only decide which tokens may be drawn).
  Greedy decoding reports temperature-1 log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from rlhf_jax.models.transformer import Model
from rlhf_jax.ops.logprobs import NEG_INF


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample completions."""

    max_new_tokens: int
    """Completion length budget ``C`` (the output is ``[B * n, C]``)."""
    eos_ids: tuple[int, ...]
    """Token ids that end a completion (several are common, e.g. Llama 3)."""
    pad_id: int
    """Written after the EOS; may equal an EOS id."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None: no limit)."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    top_p, tokens of equal probability kept together (``filter_logits``; None: off)."""
    n: int = 1
    """Samples per prompt; rows ``i*n .. i*n+n-1`` belong to prompt ``i`` (group layout)."""

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("max_new_tokens and n must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.eos_ids:
            raise ValueError("eos_ids must name at least one token")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))


class SampleOutput(NamedTuple):
    """Prompts (repeated ``n`` times), completions, their mask and log-probs."""

    prompt_tokens: Int[Array, "B P"]
    prompt_mask: Bool[Array, "B P"]
    tokens: Int[Array, "B C"]
    mask: Bool[Array, "B C"]
    """1 up to and including the first EOS."""
    logprobs: Float[Array, "B C"]
    """Sampler log-probs of ``tokens`` (0 where ``mask`` is 0)."""
    truncated: Bool[Array, " B"]
    """Rows that reached ``max_new_tokens`` without an EOS."""


def _ordered_key(z: Float[Array, "B V"]) -> Int[Array, "B V"]:
    """int32 keys ordered as the float32 values ``z`` (no NaN): the IEEE bit pattern, with the
    negatives' magnitude bits flipped so that more negative means smaller; -0.0 is read as 0.0."""
    bits = jax.lax.bitcast_convert_type(jnp.where(z == 0, 0.0, z).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _bisect(lo, hi, too_high):
    """The least int32 ``t`` in ``(lo, hi]`` per row with ``too_high(t)`` true, given
    ``too_high(hi)`` and not ``too_high(lo)`` (``too_high`` monotone): 32 halvings span int32."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        up = too_high(mid)
        return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def filter_logits(z: Float[Array, "B V"], *, top_k: int | None, top_p: float | None
                  ) -> Float[Array, "B V"]:
    """Mask (to ``NEG_INF``) the tokens outside the top-k set and outside the top-p nucleus.

    * top-k keeps ``z_i >= z_(k)``, the k-th largest value (ties with it stay);
    * top-p (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration") keeps token
      ``i`` iff the probability of the tokens strictly more likely than ``i`` is below ``top_p``,
      ``sum_{j: p_j > p_i} p_j < top_p`` with ``p = softmax(z)`` after top-k: the smallest set
      of most likely tokens whose mass reaches ``top_p``, tokens of equal probability kept or
      dropped together. The most likely token always stays.

    Neither sorts the vocabulary: each finds its threshold by bisection over the values' int32
    keys, 32 passes of a count (top-k) or a masked sum (top-p) over ``[B, V]``. On XLA:CPU at
    ``B = 8, V = 49152`` a full sort took 124 ms and ``lax.top_k(z, 50)`` 85 ms per decode step,
    more than the model's forward pass (111 ms); the bisections take 4 ms
    (``benchmarks/rollout.py``, ``filter_ms``).
    """
    if top_k is not None and top_k < z.shape[-1]:
        key = _ordered_key(z)
        rows = z.shape[0]
        # the k-th largest key: the least t with fewer than k keys above it
        kth = _bisect(jnp.full((rows,), jnp.iinfo(jnp.int32).min, jnp.int32),
                      jnp.max(key, axis=-1),
                      lambda t: jnp.sum(key > t[:, None], axis=-1) < top_k)
        z = jnp.where(key >= kth[:, None], z, NEG_INF)
    if top_p is not None and top_p < 1.0:
        probs = jax.nn.softmax(z.astype(jnp.float32), axis=-1)
        key = _ordered_key(probs)  # probabilities are >= 0: keys are their bit patterns
        # the least probability t whose strictly-more-likely mass is below top_p
        least = _bisect(jnp.full((z.shape[0],), -1, jnp.int32), jnp.max(key, axis=-1),
                        lambda t: jnp.sum(jnp.where(key > t[:, None], probs, 0.0), -1) < top_p)
        z = jnp.where(key >= least[:, None], z, NEG_INF)
    return z


def inverse_cdf_sample(probs: Float[Array, "B V"], u: Float[Array, " B"]) -> Int[Array, " B"]:
    """Exact categorical sampling from one uniform per row: the first ``i`` with ``cdf_i > u``.

    ``u`` in ``[0, 1)`` is scaled by the row's total mass, so rounding in the cumulative sum can
    never select past the end, and a token of probability 0 is never selected (its cdf equals
    its predecessor's). One uniform per row instead of ``V`` Gumbel draws: on CPU the random-bit
    generation for ``[B, V]`` noise was about a third of a decode step.
    """
    cdf = jnp.cumsum(probs, axis=-1)  # [B, V]
    target = u * cdf[:, -1]
    return jnp.sum(cdf <= target[:, None], axis=-1).astype(jnp.int32)


def _choose(logits, key, step, cfg: SamplingConfig):
    """Next token per row and its log-prob under the temperature-scaled policy."""
    z = logits.astype(jnp.float32)
    rows = jnp.arange(z.shape[0])
    if cfg.temperature == 0:
        tok = jnp.argmax(z, axis=-1)
        return tok, jax.nn.log_softmax(z, axis=-1)[rows, tok]
    z = z / cfg.temperature
    filtered = filter_logits(z, top_k=cfg.top_k, top_p=cfg.top_p)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)
    u = jax.vmap(jax.random.uniform)(keys)  # [B]
    tok = inverse_cdf_sample(jax.nn.softmax(filtered, axis=-1), u)
    return tok, jax.nn.log_softmax(z, axis=-1)[rows, tok]


def _prefill(model: Model, cfg: SamplingConfig, params, prompts, prompt_mask):
    """The prompts' KV cache and next-token logits, each prompt's repeated to its ``n`` rows:
    a group shares one prefill (``n`` times less prompt compute than prefilling every row)."""
    b, p = prompts.shape
    out = model.apply(params, prompts, attention_mask=prompt_mask,
                      cache=model.init_cache(b, p + cfg.max_new_tokens))
    logits = model.logits(params, out.hidden[:, -1:])[:, 0]  # [B, V]
    if cfg.n == 1:
        return out.cache, logits
    c = out.cache
    rep = lambda x: jnp.repeat(x, cfg.n, axis=0)  # noqa: E731  (rows lead every cache array)
    cache = c._replace(k=tuple(map(rep, c.k)), v=tuple(map(rep, c.v)), valid=rep(c.valid))
    return cache, jnp.repeat(logits, cfg.n, axis=0)


def _generate(model: Model, cfg: SamplingConfig, params, prompts, prompt_mask, key):
    cache, logits = _prefill(model, cfg, params, prompts, prompt_mask)
    if cfg.n > 1:
        prompts = jnp.repeat(prompts, cfg.n, axis=0)
        prompt_mask = jnp.repeat(prompt_mask, cfg.n, axis=0)
    b = prompts.shape[0]
    c = cfg.max_new_tokens
    eos = jnp.asarray(cfg.eos_ids)

    def cond(state):
        step, _, _, _, _, done = state
        return (step < c) & ~jnp.all(done)

    def body(state):
        step, cache, logits, toks, logps, done = state
        tok, lp = _choose(logits, key, step, cfg)
        tok = jnp.where(done, cfg.pad_id, tok)
        toks = toks.at[:, step].set(tok)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, lp))
        valid = ~done[:, None]  # finished rows write masked slots: nothing attends to them
        done = done | jnp.any(tok[:, None] == eos, axis=-1)
        o = model.apply(params, tok[:, None], attention_mask=valid, cache=cache)
        return step + 1, o.cache, model.logits(params, o.hidden)[:, 0], toks, logps, done

    toks = jnp.full((b, c), cfg.pad_id, jnp.int32)
    logps = jnp.zeros((b, c), jnp.float32)
    done = jnp.zeros((b,), bool)
    state = (jnp.int32(0), cache, logits, toks, logps, done)
    _, _, _, toks, logps, done = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.any(toks[..., None] == eos, axis=-1)
    mask = (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0
    # rows finished early keep pad_id after EOS; the mask excludes them even when pad == eos
    return SampleOutput(prompts, prompt_mask.astype(bool), toks, mask,
                        jnp.where(mask, logps, 0.0), ~jnp.any(is_eos, axis=-1))


@functools.lru_cache(maxsize=64)
def make_sampler(model: Model, cfg: SamplingConfig):
    """A jitted ``sample(params, prompts [B, P], prompt_mask [B, P], key) -> SampleOutput``.

    Prompts must be left-padded (``pad_prompts``): generation continues from the last column.
    Compiles once per input shape; cached per (model, config).
    """
    return jax.jit(functools.partial(_generate, model, cfg))


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets sorted ascending); error if n is longer than all."""
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


PAD_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
"""The lengths sequences are padded to (the next one up): few shapes, so few compiles."""


def pad_prompts(
    prompts: Sequence[Sequence[int]], *, pad_id: int, buckets: Sequence[int] = PAD_BUCKETS,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to one bucket length; returns ``(tokens [B, P], mask [B, P])``."""
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ValueError("every prompt needs at least one token")
    length = bucket_length(max(len(x) for x in prompts), buckets)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, x in enumerate(prompts):
        tokens[i, length - len(x):] = x
        mask[i, length - len(x):] = True
    return tokens, mask
