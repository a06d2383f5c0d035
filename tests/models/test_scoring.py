"""models.scoring: teacher-forced and completion log-probs, entropy, values and rewards.

Four kinds per function (STYLE 12). Hand cases use params whose logits are known: a zero
embedding makes every hidden state 0 (uniform logits, values = the value-head bias, rewards 0),
and zeroing every layer's o_proj/down_proj makes ``hidden = RMSNorm(embedding[token])``, so the
logits are ``hidden @ embedding.T`` (tied). NumPy references apply a float64 log-softmax to the
plain, unchunked ``model.logits``. All tests share a few fixed shapes (``T = P + C``) so each
jitted function compiles once for the whole file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.data.batching import pack_token_batch, pad_token_batch
from rlhf_jax.models import get_preset, init_model
from rlhf_jax.models.scoring import (
    completion_values,
    score_completions,
    sequence_logprob_sums,
    sequence_rewards,
    token_batch_logits,
    token_batch_logprobs,
    token_batch_rewards,
)
from rlhf_jax.sampling import SamplingConfig, make_sampler, pad_prompts
from rlhf_jax.types import TokenBatch
from tests.helpers import assert_all_finite, check_grads, mask_strategy, np_log_softmax, rng

CFG = get_preset("toy-1m", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                 num_heads=2, num_kv_heads=1, heads=("lm", "value", "reward"))
V, D, EPS = CFG.vocab_size, CFG.hidden_size, CFG.rms_norm_eps
P, C, EXTRA = 5, 6, 3  # rollouts: prompt, completion, extra left padding
B, T = 3, P + C  # TokenBatch shape: the right-padded equivalent of a rollout


# --- model, params, jitted functions and inputs ------------------------------------------

def _randomised(params, seed: int):
    """O(1) random params (the init's 0.02 scale gives near-uniform logits and tiny values)."""
    r = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, x in leaves:
        name = jax.tree_util.keystr(path)
        if "embedding" in name:
            v = 0.5 * r.standard_normal(x.shape)
        elif "bias" in name:
            v = 0.3 * r.standard_normal(x.shape)
        elif "weight" in name:  # RMSNorm scales
            v = 1.0 + 0.1 * r.standard_normal(x.shape)
        else:
            v = r.standard_normal(x.shape) / np.sqrt(x.shape[0])
        out.append(jnp.asarray(v, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.cache
def _toy():
    model, params = init_model(CFG, jax.random.PRNGKey(0))
    return model, _randomised(params, 0)


def _with(params, *, embedding=None, layers_off=False):
    """A copy of ``params`` with a new embedding and/or every block's output projections 0."""
    p = jax.tree.map(lambda x: x, params)
    if embedding is not None:
        p["embed"]["embedding"] = jnp.asarray(embedding, jnp.float32)
    if layers_off:
        for layer in p["layers"].values():
            for mod, name in (("attn", "o_proj"), ("mlp", "down_proj")):
                layer[mod][name]["kernel"] = jnp.zeros_like(layer[mod][name]["kernel"])
        p["norm"]["weight"] = jnp.ones_like(p["norm"]["weight"])
    return p


def _zero_emb(params):
    return _with(params, embedding=np.zeros((V, D)))


@functools.cache
def _jit(fn, **kw):
    return jax.jit(functools.partial(fn, _toy()[0], **kw))


def _score(temp):
    """The one ``score_completions`` variant per temperature that the tests share."""
    return _jit(score_completions, temperature=temp, entropy=True, values=True)


@functools.cache
def _hidden_fn():
    model = _toy()[0]
    return jax.jit(lambda p, tok, **kw: model.apply(p, tok, **kw).hidden)


def _hidden(params, tokens, **kw):
    return np.asarray(_hidden_fn()(params, jnp.asarray(tokens), **kw), np.float64)


def _np_logits(params, hidden):
    return np.asarray(_toy()[0].logits(params, jnp.asarray(hidden, jnp.float32)), np.float64)


def _head(params, name):
    return np.asarray(params[name]["kernel"], np.float64)[:, 0]


# Hand model: only tokens 1 and 2 have embeddings, c e_0 and c e_1; every other token's is 0.
# With the layers off, hidden(1) = h e_0 with h = c / sqrt(c^2 / D + eps), whose logits are
# h c for token 1 and 0 for all others; likewise hidden(2) = h e_1; hidden(other) = 0.

def _hand_params(c: float = 1.0):
    e = np.zeros((V, D), np.float32)
    e[1, 0] = e[2, 1] = c
    return _with(_toy()[1], embedding=e, layers_off=True)


def _hand_h(c: float = 1.0) -> float:
    return c / np.sqrt(c * c / D + EPS)


def _hand_lp(a: float, hit: bool) -> float:
    """log-prob of a token under logits (a for one token, 0 for the V - 1 others)."""
    return (a if hit else 0.0) - np.log(np.exp(a) + V - 1)


def _hand_entropy(a: float) -> float:
    z = np.exp(a) + V - 1
    return np.log(z) - a * np.exp(a) / z


def _rows(rows, length=T) -> TokenBatch:
    """Right-padded TokenBatch of explicit rows; every token but the first is a target."""
    items = [(ids, [0] + [1] * (len(ids) - 1)) for ids in rows]
    return TokenBatch(*map(jnp.asarray, pad_token_batch(items, length=length, pad_id=0)))


def _token_batch(r, lengths, *, loss_p=0.7) -> TokenBatch:
    items = [(r.integers(0, V, size=n), r.random(n) < loss_p) for n in lengths]
    return TokenBatch(*map(jnp.asarray, pad_token_batch(items, length=T, pad_id=0)))


def _rollout(r, prompt_lens, comp_lens, *, pad=0):
    """Random left-padded prompts ``[B, P]`` and right-padded completions ``[B, C]``."""
    n = len(prompt_lens)
    prompt = np.full((n, P), pad, np.int32)
    pmask = np.zeros((n, P), bool)
    comp = r.integers(0, V, size=(n, C)).astype(np.int32)
    for i, (lp, lc) in enumerate(zip(prompt_lens, comp_lens)):
        prompt[i, P - lp:] = r.integers(0, V, size=lp)
        pmask[i, P - lp:] = True
        comp[i, lc:] = pad
    cmask = np.arange(C)[None, :] < np.asarray(comp_lens)[:, None]
    return prompt, pmask, comp, cmask


def _hand_rollout():
    """Prompts [pad.. 1], [pad.. 5], [pad.. 2]; completions [2, 1], [1, 2, 3], [2]."""
    prompt = np.zeros((B, P), np.int32)
    prompt[:, -1] = [1, 5, 2]
    pmask = np.zeros((B, P), bool)
    pmask[:, -1] = True
    comp = np.zeros((B, C), np.int32)
    comp[0, :2], comp[1, :3], comp[2, :1] = [2, 1], [1, 2, 3], [2]
    cmask = np.arange(C)[None, :] < np.array([2, 3, 1])[:, None]
    return prompt, pmask, comp, cmask


def _repadded(prompt, pmask, extra, pad):
    """The same prompts with ``extra`` more left-padding columns (of token ``pad``)."""
    n = prompt.shape[0]
    tok = np.where(pmask, prompt, pad)
    return (np.concatenate([np.full((n, extra), pad, np.int32), tok], axis=1),
            np.concatenate([np.zeros((n, extra), bool), pmask], axis=1))


def _as_token_batch(prompt, pmask, comp, cmask):
    """The equivalent right-padded ``TokenBatch`` of ``[B, P + C]`` (loss on the completion)."""
    items = [(np.concatenate([prompt[i][pmask[i]], comp[i][cmask[i]]]),
              np.concatenate([np.zeros(pmask[i].sum(), bool), np.ones(cmask[i].sum(), bool)]))
             for i in range(prompt.shape[0])]
    return TokenBatch(*map(jnp.asarray, pad_token_batch(items, length=T, pad_id=0)))


def _check_grads(f, args, mask, empty):
    """``check_grads`` (float32, loose tolerances) of the jitted scalar ``f(*args, mask)``;
    returns the gradient at the ``empty`` mask after checking that it is finite."""
    f = jax.jit(f)
    check_grads(lambda *a: f(*a, mask), args, order=1, modes=("rev",), atol=2e-2, rtol=2e-2,
                eps=1e-2)
    g = jax.grad(f, argnums=tuple(range(len(args))))(*args, empty)
    assert_all_finite(g, "gradient")
    return g


lengths_st = st.lists(st.integers(1, T), min_size=B, max_size=B)
prompt_lens_st = st.lists(st.integers(1, P), min_size=B, max_size=B)
comp_lens_st = st.lists(st.integers(0, C), min_size=B, max_size=B)
seed_st = st.integers(0, 2**31 - 1)


# --- token_batch_logprobs ---------------------------------------------------------------

def test_token_batch_logprobs_hand():
    model, params = _toy()
    batch = _token_batch(rng(1), [T, 4, 1])
    lp = np.asarray(_jit(token_batch_logprobs)(_zero_emb(params), batch))
    np.testing.assert_allclose(lp[:, 1:], np.full((B, T - 1), -np.log(V)), rtol=1e-6)
    np.testing.assert_array_equal(lp[:, 0], 0.0)
    # rows [1, 2, 2], [2, 1], [5, 1, 2]: token 5 has embedding 0, so it predicts uniformly
    batch = _rows([[1, 2, 2], [2, 1], [5, 1, 2]])
    for temp in (1.0, 0.7):
        a = _hand_h() / temp
        got = np.asarray(_jit(token_batch_logprobs, temperature=temp)(_hand_params(), batch))
        want = [[0.0, _hand_lp(a, False), _hand_lp(a, True)], [0.0, _hand_lp(a, False)],
                [0.0, -np.log(V), _hand_lp(a, False)]]
        for row, w in zip(got, want):  # atol: z_y - logsumexp of two float32 numbers ~ 11
            np.testing.assert_allclose(row[:len(w)], w, rtol=1e-5, atol=4e-6)


def test_token_batch_logprobs_numpy():
    _, params = _toy()
    batch = _token_batch(rng(2), [T, 6, 2])
    hidden = _hidden(params, batch.tokens, attention_mask=batch.attention_mask,
                     positions=batch.positions, segment_ids=batch.segment_ids)
    tok = np.asarray(batch.tokens)
    for temp, chunks in [(1.0, {}), (0.7, {}), (0.7, dict(chunk_t=3, chunk_v=24))]:
        ref = np_log_softmax(_np_logits(params, hidden)[:, :-1] / temp)
        ref = np.take_along_axis(ref, tok[:, 1:, None], axis=-1)[..., 0]
        got = np.asarray(_jit(token_batch_logprobs, temperature=temp, **chunks)(params, batch))
        np.testing.assert_array_equal(got[:, 0], 0.0)
        np.testing.assert_allclose(got[:, 1:], ref, atol=2e-5)


@given(lengths=st.lists(st.integers(1, 5), min_size=B, max_size=B), seed=seed_st)
def test_token_batch_logprobs_property_packed_equals_padded(lengths, seed):
    _, params = _toy()
    r = rng(seed)
    items = [(r.integers(0, V, size=n), r.random(n) < 0.8) for n in lengths]
    padded = TokenBatch(*map(jnp.asarray, pad_token_batch(items, length=T, pad_id=0)))
    packed = TokenBatch(*map(jnp.asarray, pack_token_batch(items, length=T, pad_id=0,
                                                           num_rows=B)))
    fn = _jit(token_batch_logprobs)
    lp_pad, lp_pack = np.asarray(fn(params, padded)), np.asarray(fn(params, packed))
    # the same targets with the same log-probs (packing reorders documents)
    np.testing.assert_allclose(np.sort(lp_pack[np.asarray(packed.loss_mask)]),
                               np.sort(lp_pad[np.asarray(padded.loss_mask)]), atol=1e-5)
    # and what the padding holds does not matter
    junk = padded._replace(tokens=jnp.where(padded.attention_mask, padded.tokens, 17))
    m = np.asarray(padded.loss_mask)
    np.testing.assert_allclose(np.asarray(fn(params, junk))[m], lp_pad[m], atol=1e-5)


def test_token_batch_logprobs_grad():
    _, params = _toy()
    batch = _token_batch(rng(3), [5, 3, 4])
    fn = _jit(token_batch_logprobs)

    def f(emb, m):
        return jnp.sum(fn(_with(params, embedding=emb), batch._replace(loss_mask=m)) * m)

    (g,) = _check_grads(f, (params["embed"]["embedding"],), batch.loss_mask,
                        jnp.zeros_like(batch.loss_mask))
    assert float(jnp.abs(g).max()) == 0.0


# --- token_batch_logits -------------------------------------------------------------------

def test_token_batch_logits_hand():
    _, params = _toy()
    batch = _token_batch(rng(4), [T, 3, 1])
    np.testing.assert_array_equal(_jit(token_batch_logits)(_zero_emb(params), batch),
                                  np.zeros((B, T, V)))
    got = np.asarray(_jit(token_batch_logits)(_hand_params(2.0),
                                              _rows([[1, 2, 5], [2], [5, 5]])))
    assert got.dtype == np.float32
    a = 2.0 * _hand_h(2.0)
    want = np.zeros((B, T, V))
    want[0, 0, 1] = want[0, 1, 2] = want[1, 0, 2] = a  # token 5 and pad 0 give logits 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_token_batch_logits_numpy():
    _, params = _toy()
    batch = _token_batch(rng(5), [T, 7, 3])
    hidden = _hidden(params, batch.tokens, attention_mask=batch.attention_mask,
                     positions=batch.positions, segment_ids=batch.segment_ids)
    w = np.asarray(params["embed"]["embedding"], np.float64)  # tied: unembedding = E^T
    got = np.asarray(_jit(token_batch_logits)(params, batch))
    np.testing.assert_allclose(got, hidden @ w.T, rtol=1e-5, atol=1e-5)
    # layers off, the whole forward is RMSNorm(E[tok]) @ E^T, here in NumPy
    emb = rng(6).standard_normal((V, D))
    x = emb[np.asarray(batch.tokens)]
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
    got = np.asarray(_jit(token_batch_logits)(_with(params, embedding=emb, layers_off=True),
                                              batch))
    np.testing.assert_allclose(got, h @ emb.T, rtol=1e-4, atol=1e-4)


@given(lengths=lengths_st, seed=seed_st)
def test_token_batch_logits_property_consistent_and_causal(lengths, seed):
    _, params = _toy()
    batch = _token_batch(rng(seed), lengths)
    z = np.asarray(_jit(token_batch_logits)(params, batch))
    lp = np.asarray(_jit(token_batch_logprobs)(params, batch))
    ref = np.take_along_axis(np_log_softmax(z[:, :-1]), np.asarray(batch.tokens)[:, 1:, None],
                             axis=-1)[..., 0]
    np.testing.assert_allclose(lp[:, 1:], ref, atol=2e-5)
    # changing each row's last token changes its logits there and nothing before it
    rows, last = np.arange(B), np.asarray(lengths) - 1
    tok = np.asarray(batch.tokens).copy()
    tok[rows, last] = (tok[rows, last] + 1) % V
    z2 = np.asarray(_jit(token_batch_logits)(params, batch._replace(tokens=jnp.asarray(tok))))
    before = np.arange(T)[None, :] < last[:, None]
    np.testing.assert_allclose(z2[before], z[before], atol=1e-5)
    assert np.all(np.abs(z2[rows, last] - z[rows, last]).max(-1) > 1e-3)


def test_token_batch_logits_grad():
    _, params = _toy()
    batch = _token_batch(rng(7), [4, 4, 2])
    fn = _jit(token_batch_logits)
    wts = jnp.asarray(rng(8).standard_normal((B, T, V)), jnp.float32)

    def f(emb, m):
        z = fn(_with(params, embedding=emb), batch._replace(attention_mask=m))
        return jnp.sum(z * wts * batch.attention_mask[..., None]) / 10

    # a fully masked batch (no key to attend to) still has finite gradients
    _check_grads(f, (params["embed"]["embedding"],), batch.attention_mask,
                 jnp.zeros_like(batch.attention_mask))


# --- sequence_logprob_sums ------------------------------------------------------------------

def test_sequence_logprob_sums_hand():
    _, params = _toy()
    batch = _token_batch(rng(9), [T, 5, 1])
    s, n = map(np.asarray, _jit(sequence_logprob_sums)(_zero_emb(params), batch))
    count = np.asarray(batch.loss_mask).sum(-1)
    np.testing.assert_array_equal(n, count)
    np.testing.assert_allclose(s, -np.log(V) * count, rtol=1e-6)
    s, n = map(np.asarray, _jit(sequence_logprob_sums)(_hand_params(),
                                                       _rows([[1, 2, 2], [5, 1], [7]])))
    a = _hand_h()
    want = [_hand_lp(a, False) + _hand_lp(a, True), -np.log(V), 0.0]
    np.testing.assert_allclose(s, want, rtol=1e-5)
    np.testing.assert_array_equal(n, [2, 1, 0])


def test_sequence_logprob_sums_numpy():
    _, params = _toy()
    batch = _token_batch(rng(10), [T, 8, 4])
    hidden = _hidden(params, batch.tokens, attention_mask=batch.attention_mask,
                     positions=batch.positions, segment_ids=batch.segment_ids)
    logp = np_log_softmax(_np_logits(params, hidden))
    tok, m = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    want_s, want_n = np.zeros(B), np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            if m[b, t]:
                want_s[b] += logp[b, t - 1, tok[b, t]]
                want_n[b] += 1
    s, n = _jit(sequence_logprob_sums)(params, batch)
    np.testing.assert_allclose(np.asarray(s), want_s, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(n), want_n)


@given(lengths=lengths_st, loss=mask_strategy(B, T), seed=seed_st)
def test_sequence_logprob_sums_property_masked_sum_of_token_logprobs(lengths, loss, seed):
    _, params = _toy()
    batch = _token_batch(rng(seed), lengths)
    batch = batch._replace(loss_mask=jnp.asarray(loss > 0) & batch.attention_mask)
    s, n = map(np.asarray, _jit(sequence_logprob_sums)(params, batch))
    lp = np.asarray(_jit(token_batch_logprobs)(params, batch))
    m = np.asarray(batch.loss_mask, np.float32)
    np.testing.assert_allclose(s, (lp * m).sum(-1), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(n, m.sum(-1))
    assert np.all(s[n == 0] == 0.0)


def test_sequence_logprob_sums_grad():
    _, params = _toy()
    batch = _token_batch(rng(11), [5, 2, 4])
    fn = _jit(sequence_logprob_sums)

    def f(emb, m):
        return jnp.sum(fn(_with(params, embedding=emb), batch._replace(loss_mask=m))[0])

    (g,) = _check_grads(f, (params["embed"]["embedding"],), batch.loss_mask,
                        jnp.zeros_like(batch.loss_mask))
    assert float(jnp.abs(g).max()) == 0.0


# --- score_completions --------------------------------------------------------------------

def _np_completion_ref(params, prompt, pmask, comp, cmask, temp):
    """log-probs, entropy and values at hidden positions ``P - 1 + t`` (NumPy, float64)."""
    hidden = _hidden(params, np.concatenate([prompt, comp], 1),
                     attention_mask=np.concatenate([pmask, cmask], 1))[:, P - 1:-1]
    logp = np_log_softmax(_np_logits(params, hidden) / temp)
    lp = np.take_along_axis(logp, comp[..., None], axis=-1)[..., 0]
    ent = -(np.exp(logp) * logp).sum(-1)
    val = hidden @ _head(params, "value_head") + float(params["value_head"]["bias"][0])
    return lp, ent, val


def test_score_completions_hand():
    _, params = _toy()
    bias = float(params["value_head"]["bias"][0])
    k = _head(params, "value_head")
    prompt, pmask, comp, cmask = _rollout(rng(12), [P, 2, 1], [C, 3, 0])
    hp, hpm, hc, hcm = _hand_rollout()
    for temp in (1.0, 0.7):
        out = _score(temp)(_zero_emb(params), prompt, pmask, comp, cmask)
        np.testing.assert_allclose(out.logprobs, np.where(cmask, -np.log(V), 0.0), rtol=1e-6)
        np.testing.assert_allclose(out.entropy, np.where(cmask, np.log(V), 0.0), rtol=1e-6)
        # hidden 0: the value is the bias
        np.testing.assert_allclose(out.values, np.where(cmask, bias, 0.0), rtol=1e-6)
        # layers off: [1] -> [2, 1]; [5] -> [1, 2, 3]; [2] -> [2]. Each token is scored by the
        # hidden state of the token before it: 1 -> (h, e_0), 2 -> (h, e_1), 5 -> 0.
        h = _hand_h()
        a = h / temp
        out = _score(temp)(_hand_params(), hp, hpm, hc, hcm)
        miss, hit, uni = _hand_lp(a, False), _hand_lp(a, True), -np.log(V)
        ha, h0 = _hand_entropy(a), np.log(V)
        want = {"logprobs": [[miss, miss], [uni, miss, miss], [hit]],
                "entropy": [[ha, ha], [h0, ha, ha], [ha]],
                "values": [[h * k[0] + bias, h * k[1] + bias], [bias, h * k[0] + bias,
                                                                h * k[1] + bias],
                           [h * k[1] + bias]]}
        for name, rows in want.items():
            full = np.zeros((B, C))
            for i, row in enumerate(rows):
                full[i, :len(row)] = row
            np.testing.assert_allclose(getattr(out, name), full, rtol=1e-5, atol=4e-6,
                                       err_msg=f"{name}, temperature {temp}")
    plain = jax.eval_shape(functools.partial(score_completions, _toy()[0]), _hand_params(), hp,
                           hpm, hc, hcm)
    assert plain.entropy is None and plain.values is None  # not asked for: not computed


def test_score_completions_numpy():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(13), [P, 3, 1], [C, 4, 1])
    for temp in (1.0, 0.7):
        lp, ent, val = _np_completion_ref(params, prompt, pmask, comp, cmask, temp)
        outs = [_score(temp)]
        if temp != 1.0:  # chunk sizes that divide neither C nor V
            outs.append(_jit(score_completions, temperature=temp, entropy=True, values=True,
                             chunk_t=4, chunk_v=24))
        for fn in outs:
            out = fn(params, prompt, pmask, comp, cmask)
            np.testing.assert_allclose(out.logprobs, np.where(cmask, lp, 0.0), atol=2e-5)
            np.testing.assert_allclose(out.entropy, np.where(cmask, ent, 0.0), atol=2e-5)
            np.testing.assert_allclose(out.values, np.where(cmask, val, 0.0), atol=2e-5)


@given(prompt_lens=prompt_lens_st, comp_lens=comp_lens_st, holes=mask_strategy(B, C),
       seed=seed_st)
def test_score_completions_property_left_padding_mask_and_teacher_forcing(
        prompt_lens, comp_lens, holes, seed):
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(seed), prompt_lens, comp_lens)
    out = _score(0.7)(params, prompt, pmask, comp, cmask)
    wide = _score(0.7)(params, *_repadded(prompt, pmask, EXTRA, pad=9), comp, cmask)
    for a, b in zip(out, wide):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the rollout layout equals teacher forcing on the right-padded TokenBatch
    tf = np.asarray(_jit(token_batch_logprobs, temperature=0.7)(
        params, _as_token_batch(prompt, pmask, comp, cmask)))
    for i, (n, k) in enumerate(zip(prompt_lens, comp_lens)):
        np.testing.assert_allclose(np.asarray(out.logprobs)[i, :k], tf[i, n:n + k], atol=1e-5)
    # masked positions (any mask, holes included) are exactly 0
    for x in _score(0.7)(params, prompt, pmask, comp, holes > 0):
        assert np.all(np.asarray(x)[holes == 0] == 0.0)


SAMPLING = [SamplingConfig(max_new_tokens=C, eos_ids=(3,), pad_id=0, temperature=1.0),
            SamplingConfig(max_new_tokens=C, eos_ids=(3, 5), pad_id=3, temperature=0.7,
                           top_k=10)]  # pad == an EOS id


@given(prompts=st.lists(st.lists(st.integers(1, V - 1), min_size=1, max_size=P), min_size=B,
                        max_size=B), seed=seed_st, which=st.integers(0, len(SAMPLING) - 1))
def test_score_completions_property_matches_sampler(prompts, seed, which):
    model, params = _toy()
    cfg = SAMPLING[which]
    tokens, mask = pad_prompts(prompts, pad_id=0, buckets=(P,))
    out = make_sampler(model, cfg)(params, tokens, mask, jax.random.PRNGKey(seed))
    sc = _score(cfg.temperature)(params, out.prompt_tokens, out.prompt_mask, out.tokens,
                                 out.mask)
    np.testing.assert_allclose(sc.logprobs, out.logprobs, atol=1e-5)
    assert np.all(np.asarray(out.logprobs)[np.asarray(out.mask)] < 0)


def test_score_completions_grad():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(14), [P, 2, 4], [C, 2, 3])

    def f(emb, m):
        out = _score(0.7)(_with(params, embedding=emb), prompt, pmask, comp, m)
        return jnp.sum(out.logprobs) + 0.3 * jnp.sum(out.entropy) + 0.1 * jnp.sum(out.values)

    (g,) = _check_grads(f, (params["embed"]["embedding"],), cmask, np.zeros_like(cmask))
    assert float(jnp.abs(g).max()) == 0.0  # all completions empty: nothing to learn


# --- completion_values ----------------------------------------------------------------------

def test_completion_values_hand():
    _, params = _toy()
    bias, k, h = float(params["value_head"]["bias"][0]), _head(params, "value_head"), _hand_h()
    prompt, pmask, comp, cmask = _rollout(rng(15), [P, 2, 1], [C, 3, 0])
    got = _jit(completion_values)(_zero_emb(params), prompt, pmask, comp, cmask)
    np.testing.assert_allclose(got, np.where(cmask, bias, 0.0), rtol=1e-6)
    # layers off: the value at completion token t reads the hidden state of token t - 1
    got = np.asarray(_jit(completion_values)(_hand_params(), *_hand_rollout()))
    want = np.zeros((B, C))
    want[0, :2] = [h * k[0] + bias, h * k[1] + bias]
    want[1, :3] = [bias, h * k[0] + bias, h * k[1] + bias]
    want[2, :1] = [h * k[1] + bias]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_completion_values_numpy():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(16), [P, 4, 2], [C, 5, 2])
    _, _, val = _np_completion_ref(params, prompt, pmask, comp, cmask, 1.0)
    got = _jit(completion_values)(params, prompt, pmask, comp, cmask)
    np.testing.assert_allclose(got, np.where(cmask, val, 0.0), atol=2e-5)


@given(prompt_lens=prompt_lens_st, comp_lens=comp_lens_st, holes=mask_strategy(B, C),
       seed=seed_st)
def test_completion_values_property_left_padding_and_mask(prompt_lens, comp_lens, holes, seed):
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(seed), prompt_lens, comp_lens)
    fn = _jit(completion_values)
    v = np.asarray(fn(params, prompt, pmask, comp, cmask))
    wide = np.asarray(fn(params, *_repadded(prompt, pmask, EXTRA, pad=9), comp, cmask))
    np.testing.assert_allclose(wide, v, atol=1e-5)
    np.testing.assert_allclose(_score(1.0)(params, prompt, pmask, comp, cmask).values, v,
                               atol=1e-6)
    assert np.all(np.asarray(fn(params, prompt, pmask, comp, holes > 0))[holes == 0] == 0.0)


def test_completion_values_grad():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(17), [P, 3, 1], [C, 4, 2])
    fn = _jit(completion_values)

    def f(emb, kernel, m):
        p = _with(params, embedding=emb)
        p["value_head"]["kernel"] = kernel
        return jnp.sum(fn(p, prompt, pmask, comp, m))

    g = _check_grads(f, (params["embed"]["embedding"], params["value_head"]["kernel"]), cmask,
                     np.zeros_like(cmask))
    assert all(float(jnp.abs(x).max()) == 0.0 for x in g)


# --- sequence_rewards ---------------------------------------------------------------------

def test_sequence_rewards_hand():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(18), [P, 2, 1], [C, 3, 0])
    # hidden 0 and a reward head without bias: exactly 0
    np.testing.assert_array_equal(_jit(sequence_rewards)(_zero_emb(params), prompt, pmask,
                                                         comp, cmask), np.zeros(B))
    # layers off: the reward is h * kernel[0] at a last token 1, h * kernel[1] at a 2
    k, h = _head(params, "reward_head"), _hand_h()
    prompt, pmask, _, _ = _hand_rollout()  # prompts end on 1, 5 and 2
    comp = np.array([[1, 2, 0, 0, 0, 0], [5, 2, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    cmask = np.arange(C)[None, :] < np.array([2, 3, 1])[:, None]  # row 2: pad == eos == 1
    got = _jit(sequence_rewards)(_hand_params(), prompt, pmask, comp, cmask)
    np.testing.assert_allclose(np.asarray(got), [h * k[1], h * k[0], h * k[0]], rtol=1e-5,
                               atol=1e-7)
    cmask[:] = False  # empty completions: read at the last prompt token (1, 5, 2)
    got = _jit(sequence_rewards)(_hand_params(), prompt, pmask, comp, cmask)
    np.testing.assert_allclose(np.asarray(got), [h * k[0], 0.0, h * k[1]], rtol=1e-5, atol=1e-7)


def test_sequence_rewards_numpy():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(19), [P, 3, 2], [C, 2, 0])
    mask = np.concatenate([pmask, cmask], 1)
    hidden = _hidden(params, np.concatenate([prompt, comp], 1), attention_mask=mask)
    k = _head(params, "reward_head")
    want = [hidden[b, max(t for t in range(P + C) if mask[b, t])] @ k for b in range(B)]
    np.testing.assert_allclose(_jit(sequence_rewards)(params, prompt, pmask, comp, cmask), want,
                               atol=1e-5)


@given(prompt_lens=prompt_lens_st, comp_lens=comp_lens_st, seed=seed_st)
def test_sequence_rewards_property_left_padding_and_token_batch(prompt_lens, comp_lens, seed):
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(seed), prompt_lens, comp_lens)
    fn = _jit(sequence_rewards)
    r = np.asarray(fn(params, prompt, pmask, comp, cmask))
    wide = np.asarray(fn(params, *_repadded(prompt, pmask, EXTRA, pad=9), comp, cmask))
    np.testing.assert_allclose(wide, r, atol=1e-5)
    # what follows the last real completion token does not matter
    np.testing.assert_allclose(fn(params, prompt, pmask, np.where(cmask, comp, 11), cmask), r,
                               atol=1e-5)
    batch = _as_token_batch(prompt, pmask, comp, cmask)
    np.testing.assert_allclose(_jit(token_batch_rewards)(params, batch), r, atol=1e-5)


def test_sequence_rewards_grad():
    _, params = _toy()
    prompt, pmask, comp, cmask = _rollout(rng(20), [P, 3, 1], [C, 4, 2])
    pmask0 = pmask.copy()
    pmask0[2] = False  # with an empty completion, row 2 has no real token at all
    fn = _jit(sequence_rewards)

    def f(emb, kernel, m):
        p = _with(params, embedding=emb)
        p["reward_head"]["kernel"] = kernel
        return jnp.sum(fn(p, prompt, jnp.where(m.any(-1, keepdims=True), pmask, pmask0), comp,
                          m))

    g = _check_grads(f, (params["embed"]["embedding"], params["reward_head"]["kernel"]), cmask,
                     np.zeros_like(cmask))
    assert float(jnp.abs(g[1]).max()) > 0  # empty completions: read at the prompt's last token


# --- token_batch_rewards ------------------------------------------------------------------

def test_token_batch_rewards_hand():
    _, params = _toy()
    batch = _token_batch(rng(21), [T, 4, 1])
    np.testing.assert_array_equal(_jit(token_batch_rewards)(_zero_emb(params), batch),
                                  np.zeros(B))
    k, h = _head(params, "reward_head"), _hand_h()
    # read at the last real token (1, 2 and 5), not the last target nor the padding (2)
    items = [([2, 1], [0, 1]), ([1, 1, 2], [0, 1, 0]), ([1, 5], [0, 1])]
    batch = TokenBatch(*map(jnp.asarray, pad_token_batch(items, length=T, pad_id=2)))
    got = _jit(token_batch_rewards)(_hand_params(), batch)
    np.testing.assert_allclose(np.asarray(got), [h * k[0], h * k[1], 0.0], rtol=1e-5, atol=1e-7)


def test_token_batch_rewards_numpy():
    _, params = _toy()
    batch = _token_batch(rng(22), [T, 6, 2])
    hidden = _hidden(params, batch.tokens, attention_mask=batch.attention_mask,
                     positions=batch.positions)
    last = np.asarray(batch.attention_mask).sum(-1) - 1
    want = [hidden[b, last[b]] @ _head(params, "reward_head") for b in range(B)]
    np.testing.assert_allclose(_jit(token_batch_rewards)(params, batch), want, atol=1e-5)


@given(lengths=lengths_st, seed=seed_st)
def test_token_batch_rewards_property_padding_and_row_independence(lengths, seed):
    _, params = _toy()
    batch = _token_batch(rng(seed), lengths)
    fn = _jit(token_batch_rewards)
    r = np.asarray(fn(params, batch))
    junk = batch._replace(tokens=jnp.where(batch.attention_mask, batch.tokens, 13))
    np.testing.assert_allclose(fn(params, junk), r, atol=1e-5)
    # a row's reward does not depend on the other rows of its batch
    for i in range(1, B):
        rows = jax.tree.map(lambda x: x[jnp.array([i, 0, i])], batch)
        np.testing.assert_allclose(np.asarray(fn(params, rows))[[0, 2]], [r[i], r[i]], atol=1e-5)
    # the loss mask plays no part
    np.testing.assert_array_equal(fn(params, batch._replace(loss_mask=~batch.loss_mask)), r)


def test_token_batch_rewards_grad():
    _, params = _toy()
    batch = _token_batch(rng(23), [5, 3, 4])
    fn = _jit(token_batch_rewards)

    def f(emb, kernel, m):
        p = _with(params, embedding=emb)
        p["reward_head"]["kernel"] = kernel
        return jnp.sum(fn(p, batch._replace(attention_mask=m)))

    # the empty case: rows with no real token still have finite gradients
    _check_grads(f, (params["embed"]["embedding"], params["reward_head"]["kernel"]),
                 batch.attention_mask, jnp.zeros_like(batch.attention_mask))
