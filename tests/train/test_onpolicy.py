"""The on-policy engine (``train.onpolicy``) piece by piece: the scalar reward against NumPy, one
iteration of a hand-written algorithm on a tiny model, the ``score_old`` shortcut, the
algorithm's own checks, and ``live`` masking (dead rows leave the numerator and the denominator).

The engine under test runs a REINFORCE-style loss ``-sum_t A * exp(logp - old_logp)`` over the
live tokens, divided by their count, with a recording SGD that keeps the exact gradient it
applied, so gradients are compared directly instead of through parameter differences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.models import get_preset, init_model, model_for
from rlhf_jax.ops.stats import Max, Mean
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train import Forward, Models, OnPolicyAlgorithm, OnPolicyEngine, Rewards
from rlhf_jax.train.onpolicy import _reward
from rlhf_jax.types import PromptBatch, Rollout

V, P, C, N = 64, 4, 5, 4  # vocab, prompt width, new tokens, prompts (one sample each)
EOS, PAD, LR = 1, 0, 0.5
CONFIG = get_preset("toy-1m", vocab_size=V, heads=("lm",), hidden_size=32, intermediate_size=64,
                    num_layers=1, num_heads=2, num_kv_heads=1)
SAMPLING = SamplingConfig(max_new_tokens=C, eos_ids=(EOS,), pad_id=PAD, temperature=1.0)


@functools.lru_cache(maxsize=None)
def tiny():
    """``(model, host params)``: NumPy leaves, so no run shares (or donates) device arrays."""
    model, params = init_model(CONFIG, jax.random.PRNGKey(0))
    return model, jax.device_get(params)


def prompts() -> tuple[PromptBatch, np.ndarray]:
    r = np.random.default_rng(0)
    mask = np.ones((N, P), bool)
    mask[1, :2] = False  # left padding
    tokens = (r.integers(2, V, (N, P)) * mask).astype(np.int32)
    return PromptBatch(tokens, mask), np.arange(N, dtype=np.int32)


def recording_sgd(lr: float) -> optax.GradientTransformation:
    """SGD whose state is the (already divided) gradient of the last update."""
    def init(params):
        return {"grads": jax.tree.map(jnp.zeros_like, params)}

    def update(grads, state, params=None):
        return jax.tree.map(lambda g: -lr * g, grads), {"grads": grads}

    return optax.GradientTransformation(init, update)


def _advantages(ro: Rollout, flags):
    """+1 on even rows, -1 on odd ones; ``flags["drop_odd"]``: odd rows not live;
    ``flags["zero_odd"]``: odd rows' advantage 0 (still live)."""
    even = jnp.arange(ro.mask.shape[0]) % 2 == 0  # [B]
    adv = jnp.where(even, 1.0, jnp.where(flags["zero_odd"], 0.0, -1.0)) + ro.rewards
    live = even | ~flags["drop_odd"]
    tokens = jnp.sum(ro.mask, dtype=jnp.float32)
    live_tokens = jnp.sum(ro.mask & live[:, None], dtype=jnp.float32)
    return ro._replace(advantages=adv, live=live), {"all_tokens": tokens,
                                                    "live_tokens": live_tokens}


def _loss(fwd: Forward, mb: Rollout, flags):
    ratio = jnp.exp(fwd.logprobs - mb.old_logp)  # [B, C]
    m = mb.mask  # the engine has already removed rows that are not live
    total = -jnp.sum(jnp.where(m, mb.advantages[:, None] * ratio, 0.0))
    count = jnp.sum(m, dtype=jnp.float32)
    return total, count, {"tokens_in_loss": Mean(count, jnp.float32(1.0)),
                          "ratio_max": Max(jnp.max(jnp.where(m, ratio, -jnp.inf)))}


def algorithm(score_old: bool, **kw) -> OnPolicyAlgorithm:
    return OnPolicyAlgorithm(advantages=_advantages, loss=_loss, score_old=score_old, **kw)


FLAGS = {"drop_odd": np.bool_(False), "zero_odd": np.bool_(False)}


@functools.lru_cache(maxsize=None)
def engine(score_old: bool) -> OnPolicyEngine:
    model, _ = tiny()
    return OnPolicyEngine(algorithm(score_old), Models(policy=model), sampling=SAMPLING,
                          optimizer=recording_sgd(LR))


def run(score_old: bool, steps: int = 1, **flags) -> list:
    """``[(host state, host metrics)]`` after each step, from the same initial params/seed."""
    _, params = tiny()
    eng = engine(score_old)
    state = eng.init({"policy": params}, {}, seed=0, algo_state=FLAGS | {
        k: np.bool_(v) for k, v in flags.items()})
    out = []
    for _ in range(steps):
        state, metrics = eng.step(state, prompts())
        out.append((jax.device_get(state), jax.device_get(metrics)))
    return out


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@functools.lru_cache(maxsize=None)
def runs() -> dict:
    """The score-old run for two steps, the shortcut run and the live-masking runs for one."""
    return {"scored": run(True, steps=2), "reused": run(False),
            "drop_odd": run(False, drop_odd=True), "zero_odd": run(False, zero_odd=True)}


# --- the scalar reward ----------------------------------------------------------------------

def _rollout(completion: np.ndarray, mask: np.ndarray, truncated: np.ndarray) -> Rollout:
    b, c = completion.shape
    z = np.zeros((b, c), np.float32)
    return Rollout(np.full((b, 2), 5, np.int32), np.ones((b, 2), bool), completion, mask,
                   truncated, z, z)


class _Tok:
    """Decodes ids as space-separated numbers (all ``decode_completions`` needs)."""

    eos_ids = (EOS,)

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_reward_is_weighted_functions_plus_model_minus_eos_penalty():
    rows = [{"prompt": "a", "answer": 1.0}, {"prompt": "bb", "answer": -2.0},
            {"prompt": "ccc", "answer": 3.0}]

    def n_tokens(prompts, completions, **columns):
        return [len(c.split()) for c in completions]

    def answer_x_len(prompts, completions, answer):
        return [a * len(p) for p, a in zip(prompts, answer)]

    rewards = Rewards(functions={"n_tokens": n_tokens, "answer_x_len": answer_x_len},
                      weights={"n_tokens": 0.5},  # answer_x_len: weight 1 by default
                      model_weight=2.0, missing_eos_penalty=0.7)
    model, params = tiny()
    eng = OnPolicyEngine(algorithm(True), Models(policy=model),
                         sampling=SamplingConfig(max_new_tokens=4, eos_ids=(EOS,), pad_id=PAD,
                                                 n=2),
                         optimizer=optax.sgd(0.1), rewards=rewards, tokenizer=_Tok(), rows=rows)
    eng.init({"policy": params}, {}, seed=0)
    # prompts 2 and 0, two samples each: rows 2, 2, 0, 0
    completion = np.array([[7, 8, EOS, PAD], [9, 9, 9, 9], [EOS, PAD, PAD, PAD],
                           [4, 5, 6, EOS]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    truncated = np.array([False, True, False, False])
    ro = _rollout(completion, mask, truncated)
    rm = np.array([0.3, -1.2, 0.05, 2.0], np.float32)

    host, means = eng.host_rewards(ro, np.array([2, 0]))
    total, metrics = jax.device_get(_reward(ro, jnp.asarray(host), jnp.asarray(rm), rewards))

    f_tokens = np.array([2, 4, 0, 3], np.float64)  # EOS excluded
    f_answer = np.array([3.0 * 3, 3.0 * 3, 1.0 * 1, 1.0 * 1])
    want = 0.5 * f_tokens + f_answer + 2.0 * rm - 0.7 * truncated
    np.testing.assert_allclose(host, 0.5 * f_tokens + f_answer, rtol=1e-6)
    np.testing.assert_allclose(total, want, rtol=1e-6, atol=1e-6)
    assert means == pytest.approx({"rewards/n_tokens": f_tokens.mean(),
                                   "rewards/answer_x_len": f_answer.mean(),
                                   "reward_timeouts": 0.0}, rel=1e-6)
    assert metrics["reward"] == pytest.approx(want.mean(), rel=1e-6)
    assert metrics["reward_std"] == pytest.approx(want.std(), rel=1e-5)
    assert metrics["rewards/reward_model"] == pytest.approx(rm.mean(), rel=1e-6)


def test_reward_without_functions_or_model_is_the_eos_penalty():
    truncated = np.array([True, False, True])
    ro = _rollout(np.ones((3, 2), np.int32), np.ones((3, 2), bool), truncated)
    total, metrics = jax.device_get(_reward(ro, None, None, Rewards(missing_eos_penalty=0.25)))
    np.testing.assert_array_equal(total, np.array([-0.25, 0.0, -0.25], np.float32))
    assert set(metrics) == {"reward", "reward_std"}
    assert metrics["reward"] == pytest.approx(-0.5 / 3, rel=1e-6)


def test_reward_functions_need_tokenizer_and_rows():
    model, _ = tiny()
    with pytest.raises(ValueError, match="reward functions need the tokenizer and the prompt"):
        OnPolicyEngine(algorithm(True), Models(policy=model), sampling=SAMPLING,
                       optimizer=optax.sgd(0.1),
                       rewards=Rewards(functions={"f": lambda prompts, completions: [0.0]}))


def _nan_engine(non_finite: str) -> OnPolicyEngine:
    """Two samples per prompt; a reward function whose second completion's reward is NaN."""
    def flaky(prompts, completions, **columns):
        return [float("nan") if i == 1 else float(len(c)) for i, c in enumerate(completions)]

    model, _ = tiny()
    rows = [{"prompt": str(i)} for i in range(N)]
    return OnPolicyEngine(algorithm(True), Models(policy=model),
                          sampling=dataclasses.replace(SAMPLING, n=2),
                          optimizer=optax.sgd(0.1), tokenizer=_Tok(), rows=rows,
                          rewards=Rewards(functions={"flaky": flaky}, non_finite=non_finite))


def test_a_non_finite_reward_stops_the_step_naming_the_function():
    eng = _nan_engine("error")
    state = eng.init({"policy": tiny()[1]}, {}, seed=0, algo_state=FLAGS)
    with pytest.raises(ValueError, match=r"reward function 'flaky' returned a non-finite "
                                         r"reward for completion 1"):
        eng.step(state, prompts())


def test_dropped_rewards_leave_their_group_out_of_the_loss_and_are_counted():
    eng = _nan_engine("drop")
    state = eng.init({"policy": tiny()[1]}, {}, seed=0, algo_state=FLAGS)
    state, metrics = eng.step(state, prompts())
    metrics = jax.device_get(metrics)
    assert float(metrics["rewards_dropped_frac"]) == pytest.approx(2 / 8)  # prompt 0's group
    assert float(metrics["kept_frac"]) == pytest.approx(6 / 8)
    assert float(metrics["update_skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


# --- the algorithm's checks -----------------------------------------------------------------

def test_algorithm_rejects_score_old_false_with_several_updates():
    with pytest.raises(ValueError, match="score_old=False needs one update per rollout"):
        algorithm(False, epochs=2)
    with pytest.raises(ValueError, match="score_old=False needs one update per rollout"):
        algorithm(False, num_minibatches=2)
    with pytest.raises(ValueError, match="epochs and num_minibatches must be >= 1"):
        algorithm(True, epochs=0)
    algorithm(True, epochs=2, num_minibatches=2)  # scoring the policy allows any number


# --- one iteration on a tiny model ----------------------------------------------------------

EXPECTED_KEYS = {"reward", "reward_std", "loss", "grad_norm", "response_length",
                 "truncated_frac", "kept_frac", "update_skipped", "logprob_diff_sampler_trainer",
                 "all_tokens", "live_tokens", "tokens_in_loss", "ratio_max"}


@pytest.mark.parametrize("which", ["scored", "reused"])
def test_step_moves_params_and_logs_finite_metrics(which):
    out = runs()[which]
    _, init = tiny()
    for i, (state, metrics) in enumerate(out, start=1):
        assert int(state.step) == i
        assert set(metrics) == EXPECTED_KEYS, set(metrics) ^ EXPECTED_KEYS
        for k, v in metrics.items():
            assert np.isfinite(v), (k, v)
        assert metrics["update_skipped"] == 0.0 and metrics["kept_frac"] == 1.0
        assert 1.0 <= metrics["response_length"] <= C
        assert metrics["tokens_in_loss"] == metrics["live_tokens"] == metrics["all_tokens"]
        assert metrics["reward"] == 0.0  # no reward sources, no penalty
        assert metrics["logprob_diff_sampler_trainer"] < 1e-4
    state = out[-1][0]
    assert set(state.params) == {"policy"}
    moved = max(np.abs(v - flat(init)[k]).max() for k, v in flat(state.params["policy"]).items())
    assert moved > 1e-4
    # the update applied LR times the gradient it recorded, from the initial params
    first = out[0][0]
    for k, g in flat(first.opt_state["grads"]["policy"]).items():
        np.testing.assert_allclose(flat(first.params["policy"])[k], flat(init)[k] - LR * g,
                                   rtol=1e-6, atol=1e-7, err_msg=k)


def test_score_old_false_equals_scoring_the_policy_for_one_update():
    """The update's own log-probs as the "old" ones (ratio exactly 1) give the run that scores
    the policy after sampling (ratio 1 to float32 rounding): same samples, same gradient, same
    params."""
    (scored, m_scored), (reused, m_reused) = runs()["scored"][0], runs()["reused"][0]
    for k in ("reward", "response_length", "truncated_frac", "all_tokens"):
        assert m_reused[k] == m_scored[k], k  # the same tokens were sampled
    assert m_reused["ratio_max"] == 1.0
    assert m_scored["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m_reused["loss"] == pytest.approx(m_scored["loss"], rel=1e-5, abs=1e-6)
    g_reused, g_scored = flat(reused.opt_state), flat(scored.opt_state)
    assert g_reused.keys() == g_scored.keys()
    assert max(np.abs(g).max() for g in g_scored.values()) > 1e-3  # a real gradient
    for k in g_scored:
        np.testing.assert_allclose(g_reused[k], g_scored[k], rtol=1e-5, atol=1e-6, err_msg=k)
    p_reused, p_scored = flat(reused.params), flat(scored.params)
    for k in p_scored:
        np.testing.assert_allclose(p_reused[k], p_scored[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_rows_that_are_not_live_contribute_nothing():
    """Dropping the odd rows (``live=False``) gives the gradient of the even rows alone: the
    run that keeps the odd rows with advantage 0 (numerator the same) divided by the live
    tokens instead of all tokens (denominator)."""
    (dropped, m_drop), (zeroed, m_zero) = runs()["drop_odd"][0], runs()["zero_odd"][0]
    assert m_drop["all_tokens"] == m_zero["all_tokens"]  # the same samples
    assert m_drop["tokens_in_loss"] == m_drop["live_tokens"] < m_drop["all_tokens"]
    assert m_zero["tokens_in_loss"] == m_zero["all_tokens"]
    assert m_drop["kept_frac"] == 0.5 and m_zero["kept_frac"] == 1.0
    scale = m_zero["all_tokens"] / m_drop["live_tokens"]
    g_drop, g_zero = flat(dropped.opt_state), flat(zeroed.opt_state)
    assert max(np.abs(g).max() for g in g_drop.values()) > 1e-3
    for k in g_drop:
        np.testing.assert_allclose(g_drop[k], g_zero[k] * scale, rtol=1e-5, atol=1e-7,
                                   err_msg=k)
    # and the odd rows do matter when live: the full run's gradient differs
    g_full = flat(runs()["reused"][0][0].opt_state)
    assert any(not np.allclose(g_full[k], g_drop[k], rtol=1e-3, atol=1e-5) for k in g_drop)


# --- memory: donation, a bfloat16 reference -------------------------------------------------

def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_update_donates_the_state_it_replaces():
    """The compiled update aliases the whole state (params and optimizer state) to its output:
    ``memory_analysis`` reports at least those bytes as aliased, and the old state's buffers
    are deleted after the call (no second copy of the weights lives through the update)."""
    model, params = tiny()
    eng = OnPolicyEngine(algorithm(False), Models(policy=model), sampling=SAMPLING,
                         optimizer=recording_sgd(LR))
    state = jax.device_put(eng.init({"policy": params}, {}, seed=0, algo_state=FLAGS))
    batch, _ = prompts()
    ro, rm, _ = eng.sample(state, state.step, batch)
    mem = eng.update_jit.lower(state, eng.frozen, ro, None, rm).compile().memory_analysis()
    assert mem.alias_size_in_bytes >= _nbytes((state.params, state.opt_state)) > 0
    old = jax.tree.leaves(state.params)
    eng.update_jit(state, eng.frozen, ro, None, rm)
    assert all(x.is_deleted() for x in old)


def test_bfloat16_reference_logprobs_are_float32_and_close_to_the_float32_reference():
    """A frozen reference stored and run in bfloat16 (``ModelSpec(dtype="bfloat16")``): its
    rollout log-probs are float32 (softmax in float32), within bfloat16 rounding of the float32
    reference's, and its params take half the bytes."""
    model, params = tiny()
    ref16 = model_for(CONFIG.replace(param_dtype="bfloat16", dtype="bfloat16"))
    params16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    batch, _ = prompts()
    out = {}
    for name, ref, p in (("f32", model, params), ("bf16", ref16, params16)):
        eng = OnPolicyEngine(algorithm(False), Models(policy=model, reference=ref),
                             sampling=SAMPLING, optimizer=recording_sgd(LR))
        state = eng.init({"policy": params}, {"reference": p}, seed=0, algo_state=FLAGS)
        out[name] = jax.device_get(eng.sample(state, state.step, batch)[0])
    assert _nbytes(params16) * 2 == _nbytes(params)
    a, b = out["f32"], out["bf16"]
    np.testing.assert_array_equal(a.completion, b.completion)  # the same policy sampled
    assert b.ref_logp.dtype == np.float32
    np.testing.assert_allclose(a.ref_logp, a.sampler_logp, atol=1e-5)  # reference == policy
    gap = np.abs(b.ref_logp - a.ref_logp)[a.mask]
    assert 0.0 < gap.max() < 0.1, gap.max()
