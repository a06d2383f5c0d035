"""Tests of rlhf_jax/ops/advantages.py: hand cases, NumPy loops, properties, gradients.

Semantics under test: masked positions get 0 and are *skipped* by the backward recursions (the
value and advantage carried backwards pass through them), so holes, right and left padding are
all handled; ``bootstrap_value`` is ``V`` after the last valid token. Group estimators take
``[N * G]`` rewards laid out prompt-major.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax.ops import (
    discounted_returns,
    gae_advantages,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from tests.helpers import (
    assert_all_finite,
    check_grads,
    float_array_strategy,
    mask_strategy,
    random_mask,
    right_padded_mask,
    rng,
)

B, T = 3, 6  # fixed shapes for the property tests (one compile per shape)
NAN, INF = float("nan"), float("inf")


# Jitted wrappers for the property tests: eager lax.scan retraces on every call.
_returns = jax.jit(discounted_returns, static_argnames=("gamma",))
_gae = jax.jit(gae_advantages, static_argnames=("gamma", "lam"))
_rpp = jax.jit(reinforce_pp_advantages, static_argnames=("gamma", "eps"))
_group = jax.jit(group_advantages,
                 static_argnames=("group_size", "scale_by_std", "std_ddof", "eps"))
_rloo = jax.jit(rloo_advantages, static_argnames=("group_size",))


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


# ------------------------------------------------------------------ NumPy loop references


def np_returns(r, m, gamma, boot):
    r, m = np.asarray(r, np.float64), np.asarray(m) > 0
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        g = float(boot[b])
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                g = r[b, t] + gamma * g
                out[b, t] = g
    return out


def np_gae(r, v, m, gamma, lam, boot):
    r, v, m = np.asarray(r, np.float64), np.asarray(v, np.float64), np.asarray(m) > 0
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        v_next, a_next = float(boot[b]), 0.0
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                delta = r[b, t] + gamma * v_next - v[b, t]
                a_next = delta + gamma * lam * a_next
                v_next = v[b, t]
                adv[b, t] = a_next
    return adv, np.where(m, adv + v, 0.0)


def np_group(r, g, scale, ddof, eps):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    for s in range(0, len(r), g):
        grp = r[s:s + g]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - ddof)
        for i in range(g):
            out[s + i] = (grp[i] - mean) / (np.sqrt(var) + eps) if scale else grp[i] - mean
    return out


def np_rloo(r, g):
    r = np.asarray(r, np.float64)
    out = np.zeros_like(r)
    for s in range(0, len(r), g):
        for i in range(g):
            others = [r[s + j] for j in range(g) if j != i]
            out[s + i] = r[s + i] - sum(others) / (g - 1)
    return out


def np_reinforce_pp(r, m, gamma):
    ret = np_returns(r, m, gamma, np.zeros(r.shape[0]))
    vals = [ret[b, t] for b in range(r.shape[0]) for t in range(r.shape[1]) if m[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((x - mean) ** 2 for x in vals) / len(vals)  # population variance (OpenRLHF)
    return np.where(np.asarray(m) > 0, (ret - mean) / np.sqrt(var + 1e-8), 0.0)


def _masks(r):
    """Masks with holes, right padding, left padding; one row of each forced empty/single."""
    holes = random_mask(r, 4, 7, p=0.6, empty_rows=1, single_rows=1)
    right = right_padded_mask(r, 4, 7)
    left = right_padded_mask(r, 4, 7)[:, ::-1].copy()
    return {"holes": holes, "right": right, "left": left}


# ------------------------------------------------------------------ discounted_returns


def test_discounted_returns_hand():
    # gamma = 0.5, r = [1, 2, 3]: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75.
    out = discounted_returns(jnp.array([[1.0, 2.0, 3.0]]), jnp.ones((1, 3)), gamma=0.5)
    _close(out, [[2.75, 3.5, 3.0]], atol=0)
    # bootstrap 4: G2 = 3 + 0.5*4 = 5, G1 = 2 + 2.5 = 4.5, G0 = 1 + 2.25 = 3.25.
    out = discounted_returns(jnp.array([[1.0, 2.0, 3.0]]), jnp.ones((1, 3)), gamma=0.5,
                             bootstrap_value=jnp.array([4.0]))
    _close(out, [[3.25, 4.5, 5.0]], atol=0)


def test_discounted_returns_hand_hole_is_skipped():
    # mask [1, 0, 1], r = [1, 99, 2], gamma 0.5: G2 = 2, (t=1 skipped, 0), G0 = 1 + 0.5*2 = 2.
    out = discounted_returns(jnp.array([[1.0, 99.0, 2.0]]), jnp.array([[1, 0, 1]]), gamma=0.5)
    _close(out, [[2.0, 0.0, 2.0]], atol=0)


@pytest.mark.parametrize("kind", ["holes", "right", "left"])
def test_discounted_returns_numpy(kind):
    r = rng(1)
    m = _masks(r)[kind]
    rew = r.normal(size=m.shape).astype(np.float32)
    boot = r.normal(size=m.shape[0]).astype(np.float32)
    boot[::2] = 0.0  # terminated rows
    for gamma in (1.0, 0.9):
        out = discounted_returns(rew, m, gamma=gamma, bootstrap_value=boot)
        _close(out, np_returns(rew, m, gamma, boot))


@given(mask=mask_strategy(B, T), r=float_array_strategy((B, T)), junk=float_array_strategy((B, T)))
def test_discounted_returns_property_masked_values_ignored(mask, r, junk):
    # Whatever sits at masked positions (here junk, or inf) changes nothing.
    a = _returns(r, mask, gamma=0.9)
    b = _returns(np.where(mask > 0, r, junk), mask, gamma=0.9)
    c = _returns(np.where(mask > 0, r, INF), mask, gamma=0.9)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert np.all(np.asarray(a)[mask == 0] == 0.0)


@given(r=float_array_strategy((1, T)), length=st.integers(1, T),
       boot=st.floats(-3, 3, allow_subnormal=False))
def test_discounted_returns_property_mask_equals_slice(r, length, boot):
    mask = (np.arange(T) < length).astype(np.float32)[None]
    bv = jnp.array([boot], jnp.float32)
    full = _returns(r, mask, gamma=0.8, bootstrap_value=bv)
    sliced = _returns(r[:, :length], np.ones((1, length)), gamma=0.8, bootstrap_value=bv)
    _close(np.asarray(full)[:, :length], sliced, rtol=1e-6, atol=1e-6)


@given(mask=mask_strategy(B, T), r=float_array_strategy((B, T)))
def test_discounted_returns_property_gamma_one_is_suffix_sum(mask, r):
    out = np.asarray(_returns(r, mask, gamma=1.0))
    rm = np.where(mask > 0, r, 0.0).astype(np.float64)
    suffix = np.cumsum(rm[:, ::-1], axis=1)[:, ::-1]
    _close(out, np.where(mask > 0, suffix, 0.0), atol=1e-4)


def test_discounted_returns_grad():
    r = rng(2)
    m = random_mask(r, 3, 5, empty_rows=1)
    rew = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
    w = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
    f = lambda x: jnp.sum(w * discounted_returns(x, m, gamma=0.7))  # noqa: E731
    check_grads(f, (rew,), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_discounted_returns_grad_analytic():
    # dG_t/dr_s = gamma^(s - t) for s >= t on a full row; d/dr at masked positions is 0.
    gamma = 0.5
    jac = jax.jacobian(lambda x: discounted_returns(x, jnp.ones((1, 4)), gamma=gamma)[0])(
        jnp.zeros((1, 4)))[:, 0, :]
    expected = np.array([[gamma ** (s - t) if s >= t else 0.0 for s in range(4)] for t in range(4)])
    _close(jac, expected, atol=0)
    g = jax.grad(lambda x: discounted_returns(x, jnp.array([[1, 0, 1, 0]]), gamma=0.5).sum())(
        jnp.full((1, 4), INF).at[0, 0].set(1.0).at[0, 2].set(2.0))
    _close(g, [[1.0, 0.0, 1.5, 0.0]], atol=0)  # dG0 = 1 (r0) ; r2 feeds G2 and 0.5*G0


# ------------------------------------------------------------------ gae_advantages


def test_gae_advantages_hand_three_steps():
    # r = [0, 0, 1], V = 0.5 everywhere, gamma = 1, lam = 0.5, terminated (bootstrap 0):
    # delta2 = 1 + 0 - 0.5 = 0.5; A2 = 0.5
    # delta1 = 0 + 0.5 - 0.5 = 0;  A1 = 0 + 0.5 * 0.5 = 0.25
    # delta0 = 0;                  A0 = 0.5 * 0.25 = 0.125;  returns A + V = [0.625, 0.75, 1.0]
    adv, ret = gae_advantages(jnp.array([[0.0, 0.0, 1.0]]), jnp.full((1, 3), 0.5),
                              jnp.ones((1, 3)), gamma=1.0, lam=0.5)
    _close(adv, [[0.125, 0.25, 0.5]], atol=0)
    _close(ret, [[0.625, 0.75, 1.0]], atol=0)


def test_gae_advantages_hand_hole_and_bootstrap():
    # mask [1, 0, 1], r = [1, x, 2], V = [1, x, 0.5], gamma 0.5, lam 1, bootstrap 2 (truncated):
    # t2: delta = 2 + 0.5*2 - 0.5 = 2.5, A = 2.5;      t1: masked -> 0, skipped
    # t0: delta = 1 + 0.5*0.5 - 1 = 0.25, A = 0.25 + 0.5*1*2.5 = 1.5; returns [2.5, 0, 3.0]
    adv, ret = gae_advantages(jnp.array([[1.0, 7.0, 2.0]]), jnp.array([[1.0, -9.0, 0.5]]),
                              jnp.array([[1, 0, 1]]), gamma=0.5, lam=1.0,
                              bootstrap_value=jnp.array([2.0]))
    _close(adv, [[1.5, 0.0, 2.5]], atol=0)
    _close(ret, [[2.5, 0.0, 3.0]], atol=0)


def test_gae_advantages_hand_two_rows_hardcoded():
    # Like flax ppo_lib_test.test_gae_hardcoded: gamma = lam = 0.8, V = 1 everywhere.
    # Row 0, r = [1, 0], full:  delta1 = 0 + 0 - 1 = -1, A1 = -1;
    #                            delta0 = 1 + 0.8 - 1 = 0.8, A0 = 0.8 + 0.64 * (-1) = 0.16.
    # Row 1, r = [-1, 1], only t0 valid: delta0 = -1 + 0 - 1 = -2 = A0.
    adv, _ = gae_advantages(jnp.array([[1.0, 0.0], [-1.0, 1.0]]), jnp.ones((2, 2)),
                            jnp.array([[1, 1], [1, 0]]), gamma=0.8, lam=0.8)
    _close(adv, [[0.16, -1.0], [-2.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("kind", ["holes", "right", "left"])
def test_gae_advantages_numpy(kind):
    r = rng(3)
    m = _masks(r)[kind]
    rew = r.normal(size=m.shape).astype(np.float32)
    val = r.normal(size=m.shape).astype(np.float32)
    boot = r.normal(size=m.shape[0]).astype(np.float32)
    boot[1::2] = 0.0
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.5, 0.0)):
        adv, ret = gae_advantages(rew, val, m, gamma=gamma, lam=lam, bootstrap_value=boot)
        eadv, eret = np_gae(rew, val, m, gamma, lam, boot)
        _close(adv, eadv)
        _close(ret, eret)


@given(r=float_array_strategy((1, T)), v=float_array_strategy((1, T)), length=st.integers(1, T),
       boot=st.floats(-3, 3, allow_subnormal=False))
def test_gae_advantages_property_mask_equals_slice(r, v, length, boot):
    mask = (np.arange(T) < length).astype(np.float32)[None]
    bv = jnp.array([boot], jnp.float32)
    adv, ret = _gae(r, v, mask, gamma=0.9, lam=0.8, bootstrap_value=bv)
    sa, sr = _gae(r[:, :length], v[:, :length], np.ones((1, length)), gamma=0.9,
                            lam=0.8, bootstrap_value=bv)
    _close(np.asarray(adv)[:, :length], sa, rtol=1e-6, atol=1e-6)
    _close(np.asarray(ret)[:, :length], sr, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(adv)[:, length:] == 0) and np.all(np.asarray(ret)[:, length:] == 0)


@given(mask=mask_strategy(1, T), r=float_array_strategy((1, T)), v=float_array_strategy((1, T)))
def test_gae_advantages_property_holes_equal_compacted(mask, r, v):
    # Skipping holes = running on the row with the holes removed.
    keep = mask[0] > 0
    adv, _ = _gae(np.where(mask > 0, r, NAN), np.where(mask > 0, v, INF), mask,
                            gamma=0.9, lam=0.7)
    adv = np.asarray(adv)
    assert np.all(adv[~mask.astype(bool)] == 0)
    if keep.sum():
        n = int(keep.sum())
        ca, _ = _gae(r[:, keep], v[:, keep], np.ones((1, n)), gamma=0.9, lam=0.7)
        _close(adv[:, keep], ca, rtol=1e-6, atol=1e-6)


@given(mask=mask_strategy(B, T), r=float_array_strategy((B, T)))
def test_gae_advantages_property_zero_values_unit_gamma_lam_is_reward_to_go(mask, r):
    adv, ret = _gae(r, np.zeros((B, T), np.float32), mask, gamma=1.0, lam=1.0)
    rm = np.where(mask > 0, r, 0.0).astype(np.float64)
    togo = np.where(mask > 0, np.cumsum(rm[:, ::-1], axis=1)[:, ::-1], 0.0)
    _close(adv, togo, atol=1e-4)
    _close(ret, togo, atol=1e-4)


@given(mask=mask_strategy(B, T), r=float_array_strategy((B, T)), v=float_array_strategy((B, T)),
       boot=float_array_strategy((B,)))
def test_gae_advantages_property_lam_one_returns_are_discounted_returns(mask, r, v, boot):
    # With lam = 1 the value terms telescope: A_t + V_t = G_t whatever V is.
    _, ret = _gae(r, v, mask, gamma=0.9, lam=1.0, bootstrap_value=boot)
    _close(ret, _returns(r, mask, gamma=0.9, bootstrap_value=boot), atol=1e-4)


def test_gae_advantages_grad():
    r = rng(4)
    m = random_mask(r, 3, 5, empty_rows=1, single_rows=1)
    rew = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
    val = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
    boot = jnp.asarray(r.normal(size=3), jnp.float32)
    w = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)

    def f(x, v, b):
        adv, ret = gae_advantages(x, v, m, gamma=0.9, lam=0.8, bootstrap_value=b)
        return jnp.sum(w * adv) + jnp.sum(w * ret) * 0.5

    check_grads(f, (rew, val, boot), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_gae_advantages_grad_analytic():
    # Full row: dA_t/dr_s = (gamma lam)^(s-t); dA_t/dV_s = -1 (s = t),
    # (gamma lam)^(s-t-1) gamma (1-lam) for s > t; masked entries (even inf) get gradient 0.
    g, lam = 0.9, 0.5
    jr = jax.jacobian(lambda x: gae_advantages(x, jnp.zeros((1, 3)), jnp.ones((1, 3)),
                                               gamma=g, lam=lam)[0][0])(jnp.zeros((1, 3)))[:, 0]
    jv = jax.jacobian(lambda v: gae_advantages(jnp.zeros((1, 3)), v, jnp.ones((1, 3)),
                                               gamma=g, lam=lam)[0][0])(jnp.zeros((1, 3)))[:, 0]
    c = g * lam
    _close(jr, [[1, c, c * c], [0, 1, c], [0, 0, 1]], atol=1e-6)
    k = g * (1 - lam)
    _close(jv, [[-1, k, c * k], [0, -1, k], [0, 0, -1]], atol=1e-6)
    m = jnp.array([[1, 0, 1]])
    gr, gv = jax.grad(lambda x, v: gae_advantages(x, v, m, gamma=g, lam=lam)[0].sum(),
                      argnums=(0, 1))(jnp.array([[1.0, INF, 1.0]]), jnp.array([[0.0, NAN, 0.0]]))
    assert_all_finite((gr, gv), "gradient")
    assert gr[0, 1] == 0 and gv[0, 1] == 0


# ------------------------------------------------------------------ group_advantages


def test_group_advantages_hand():
    r = jnp.array([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, centred [-1.5, -0.5, 0.5, 1.5], sum of squares 5.
    # ddof 1: std = sqrt(5/3) = 1.290994 -> [-1.161895, -0.387298, 0.387298, 1.161895]
    _close(group_advantages(r, group_size=4), [-1.161895, -0.387298, 0.387298, 1.161895])
    # ddof 0: std = sqrt(5/4) = 1.118034 -> [-1.341641, -0.447214, 0.447214, 1.341641]
    _close(group_advantages(r, group_size=4, std_ddof=0),
           [-1.341641, -0.447214, 0.447214, 1.341641])
    # Dr.GRPO (no std): the centred rewards.
    _close(group_advantages(r, group_size=4, scale_by_std=False), [-1.5, -0.5, 0.5, 1.5], atol=0)
    # Two groups of 2: [0, 1] -> centred [-0.5, 0.5], ddof-1 std sqrt(0.5) = 0.707107 ->
    # [-0.707107, 0.707107]; [5, 5] -> exactly 0.
    out = group_advantages(jnp.array([0.0, 1.0, 5.0, 5.0]), group_size=2)
    _close(out, [-0.707107, 0.707107, 0.0, 0.0])
    # Identical rewards: exactly 0, even where the float32 mean of 3 copies of 123.456 is not
    # 123.456 (a naive r - mean gives ~8e-6, which the std division blows up to ~0.7).
    for scale in (True, False):
        out = group_advantages(jnp.full(6, 123.456), group_size=3, scale_by_std=scale)
        np.testing.assert_array_equal(np.asarray(out), np.zeros(6))


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_numpy(scale, ddof):
    r = rng(5)
    for g in (2, 3, 8):
        rew = (r.normal(size=4 * g) * 3 + 1).astype(np.float32)
        out = group_advantages(rew, group_size=g, scale_by_std=scale, std_ddof=ddof)
        _close(out, np_group(rew, g, scale, ddof, 1e-6), rtol=1e-5, atol=1e-5)


def _grouped_rewards(n=4, g=3):
    """Rewards where some groups are identical (binary-ish, big, small values).

    G = 3 on purpose: a float32 mean of 3 copies of c need not be c (with G = 4 it always is).
    """
    val = st.sampled_from([0.0, 1.0, 0.1, 123.456, -7.3, 1e-3, 3.0e4])
    return st.lists(st.one_of(st.lists(val, min_size=g, max_size=g),
                              val.map(lambda x: [x] * g)), min_size=n, max_size=n).map(
        lambda x: np.asarray(x, np.float32).reshape(-1))


@given(rew=_grouped_rewards(), perm_seed=st.integers(0, 2**31), scale=st.booleans(),
       ddof=st.sampled_from([0, 1]))
def test_group_advantages_property_shuffle_within_group(rew, perm_seed, scale, ddof):
    g = 3
    p = np.random.default_rng(perm_seed)
    perm = np.concatenate([i * g + p.permutation(g) for i in range(len(rew) // g)])
    kw = dict(group_size=g, scale_by_std=scale, std_ddof=ddof)
    a = np.asarray(_group(rew, **kw))
    b = np.asarray(_group(rew[perm], **kw))
    _close(b, a[perm], rtol=1e-4, atol=1e-4)


@given(rew=_grouped_rewards(), scale=st.booleans(), ddof=st.sampled_from([0, 1]))
def test_group_advantages_property_identical_rewards_exactly_zero(rew, scale, ddof):
    g = 3
    out = np.asarray(_group(rew, group_size=g, scale_by_std=scale, std_ddof=ddof))
    same = np.all(rew.reshape(-1, g) == rew.reshape(-1, g)[:, :1], axis=1)
    assert np.all(out.reshape(-1, g)[same] == 0.0), (rew, out)
    # group mean is 0 for every group, up to float32 rounding at the rewards' magnitude
    _close(out.reshape(-1, g).mean(1), 0.0, atol=1e-3 + 1e-6 * g * float(np.abs(rew).max()))


@given(rew=float_array_strategy((12,)), ddof=st.sampled_from([0, 1]))
def test_group_advantages_property_mean_zero_std_one(rew, ddof):
    out = np.asarray(_group(rew, group_size=4, std_ddof=ddof), np.float64).reshape(3, 4)
    _close(out.mean(1), 0.0, atol=1e-5)
    spread = rew.reshape(3, 4).std(1)
    ok = spread > 1e-2  # scaled groups have std 1 (eps is negligible there)
    _close(out[ok].std(1, ddof=ddof), 1.0, rtol=1e-3, atol=1e-3)


def test_group_advantages_property_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(jnp.ones(4), group_size=1)
    with pytest.raises(ValueError, match="group_size = 3"):
        group_advantages(jnp.ones(4), group_size=3)
    with pytest.raises(ValueError):
        group_advantages(jnp.ones((2, 2)), group_size=2)


def test_group_advantages_grad():
    rew = jnp.asarray(rng(6).normal(size=8), jnp.float32)
    w = jnp.asarray(rng(7).normal(size=8), jnp.float32)
    for scale in (True, False):
        f = lambda x: jnp.sum(w * group_advantages(x, group_size=4, scale_by_std=scale))  # noqa
        check_grads(f, (rew,), order=1, modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


def test_group_advantages_grad_identical_rewards_finite():
    # sqrt at var = 0 has an infinite derivative: the double where must keep the gradient finite.
    rew = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.5, 0.5])
    g = jax.grad(lambda x: jnp.sum(jnp.arange(8.0) * group_advantages(x, group_size=4)))(rew)
    assert_all_finite(g, "gradient")
    # Dr.GRPO is linear: d sum_i w_i A_i / d r_j = w_j - mean_g(w).
    w = jnp.arange(8.0)
    g = jax.grad(lambda x: jnp.sum(w * group_advantages(x, group_size=4, scale_by_std=False)))(rew)
    _close(g, [-1.5, -0.5, 0.5, 1.5, -1.5, -0.5, 0.5, 1.5], atol=1e-6)


# ------------------------------------------------------------------ rloo_advantages


def test_rloo_advantages_hand():
    # [1, 2, 3, 4]: leave-one-out means 3, 8/3, 7/3, 2 -> A = [-2, -2/3, 2/3, 2]
    # (= 4/3 * (r - 2.5)).
    _close(rloo_advantages(jnp.array([1.0, 2.0, 3.0, 4.0]), group_size=4),
           [-2.0, -2 / 3, 2 / 3, 2.0])
    # groups of 2: [0, 1] -> [-1, 1]; [5, 5] -> [0, 0]
    _close(rloo_advantages(jnp.array([0.0, 1.0, 5.0, 5.0]), group_size=2), [-1, 1, 0, 0], atol=0)
    np.testing.assert_array_equal(np.asarray(rloo_advantages(jnp.full(3, 123.456), group_size=3)),
                                  np.zeros(3))


def test_rloo_advantages_numpy():
    r = rng(8)
    for g in (2, 3, 8):
        rew = (r.normal(size=4 * g) * 2).astype(np.float32)
        _close(rloo_advantages(rew, group_size=g), np_rloo(rew, g))


@given(rew=float_array_strategy((12,)), g=st.sampled_from([2, 3, 4, 6]))
def test_rloo_advantages_property_scaled_centred(rew, g):
    r64 = rew.astype(np.float64).reshape(-1, g)
    expected = g / (g - 1) * (r64 - r64.mean(1, keepdims=True))
    out = np.asarray(_rloo(rew, group_size=g)).reshape(-1, g)
    _close(out, expected, atol=1e-4)
    _close(out.mean(1), 0.0, atol=1e-4)


@given(rew=_grouped_rewards(), perm_seed=st.integers(0, 2**31))
def test_rloo_advantages_property_shuffle_and_identical(rew, perm_seed):
    g = 3
    p = np.random.default_rng(perm_seed)
    perm = np.concatenate([i * g + p.permutation(g) for i in range(len(rew) // g)])
    a = np.asarray(_rloo(rew, group_size=g))
    _close(np.asarray(_rloo(rew[perm], group_size=g)), a[perm], rtol=1e-5, atol=1e-3)
    same = np.all(rew.reshape(-1, g) == rew.reshape(-1, g)[:, :1], axis=1)
    assert np.all(a.reshape(-1, g)[same] == 0.0), (rew, a)


def test_rloo_advantages_property_rejects_bad_groups():
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(jnp.ones(4), group_size=1)
    with pytest.raises(ValueError, match="group_size = 3"):
        rloo_advantages(jnp.ones(4), group_size=3)


def test_rloo_advantages_grad():
    # Linear map: dA_i/dr_j = 1 (i = j), -1/(G-1) (same group, i != j), 0 across groups.
    g = 3
    rew = jnp.asarray(rng(9).normal(size=6), jnp.float32)
    jac = np.asarray(jax.jacobian(lambda x: rloo_advantages(x, group_size=g))(rew))
    block = np.full((g, g), -1 / (g - 1)) + np.eye(g) * (1 + 1 / (g - 1))
    _close(jac, np.kron(np.eye(2), block), atol=1e-6)
    check_grads(lambda x: jnp.sum(jnp.sin(rloo_advantages(x, group_size=g))), (rew,), order=1,
                modes=["rev"], eps=1e-3, atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------ reinforce_pp_advantages


def test_reinforce_pp_advantages_hand():
    # Rows r = [0, 1, 2] (full) and [5, x, x] (one token), gamma 1:
    # returns [3, 3, 2] and [5]; mean 13/4 = 3.25; deviations [-0.25, -0.25, -1.25, 1.75];
    # squares sum 4.75; population var (ddof=0, as OpenRLHF) 4.75/4 = 1.1875, std 1.089725 ->
    # [-0.229416, -0.229416, -1.147079, 1.605910] (the Bessel-corrected std gave
    # [-0.198680, -0.198680, -0.993399, 1.390759])
    out = reinforce_pp_advantages(jnp.array([[0.0, 1.0, 2.0], [5.0, 8.0, 9.0]]),
                                  jnp.array([[1, 1, 1], [1, 0, 0]]))
    _close(out, [[-0.229416, -0.229416, -1.147079], [1.605910, 0.0, 0.0]])


def test_reinforce_pp_advantages_numpy():
    r = rng(10)
    for m in _masks(r).values():
        rew = r.normal(size=m.shape).astype(np.float32)
        for gamma in (1.0, 0.9):
            _close(reinforce_pp_advantages(rew, m, gamma=gamma), np_reinforce_pp(rew, m, gamma),
                   atol=1e-4)


@given(mask=mask_strategy(B, T), r=float_array_strategy((B, T)), junk=float_array_strategy((B, T)))
def test_reinforce_pp_advantages_property_whitened(mask, r, junk):
    out = np.asarray(_rpp(np.where(mask > 0, r, junk), mask), np.float64)
    assert np.all(out[mask == 0] == 0.0)
    valid = out[mask > 0]
    if valid.size:
        _close(valid.mean(), 0.0, atol=1e-4)
    g = np_returns(r, mask, 1.0, np.zeros(B))[mask > 0]
    if valid.size >= 2 and g.std() > 1e-2:
        _close(valid.std(ddof=0), 1.0, rtol=1e-3)


@given(mask=mask_strategy(B, T), r=float_array_strategy((B, T)),
       c=st.floats(0.1, 10.0, allow_subnormal=False))
def test_reinforce_pp_advantages_property_scale_invariant(mask, r, c):
    a = _rpp(r, mask, gamma=0.9)
    b = _rpp(r * np.float32(c), mask, gamma=0.9)
    g = np_returns(r, mask, 0.9, np.zeros(B))[mask > 0]
    if g.size >= 2 and g.std() > 1e-1:
        _close(a, b, atol=1e-3, rtol=1e-3)


def test_reinforce_pp_advantages_grad():
    r = rng(11)
    m = random_mask(r, 3, 5, empty_rows=1, single_rows=1)
    rew = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
    w = jnp.asarray(r.normal(size=(3, 5)), jnp.float32)
    f = lambda x: jnp.sum(w * reinforce_pp_advantages(x, m, gamma=0.9))  # noqa: E731
    check_grads(f, (rew,), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mask", [[[0, 0, 0], [0, 0, 0]], [[0, 1, 0], [0, 0, 0]]])
def test_reinforce_pp_advantages_grad_empty_and_single_mask_finite(mask):
    m = jnp.array(mask)
    x = jnp.array([[1.0, 2.0, INF], [NAN, 0.5, 3.0]])
    out, g = jax.value_and_grad(lambda x: jnp.sum(reinforce_pp_advantages(x, m)))(x)
    assert_all_finite((out, g), "value/gradient")
    _close(reinforce_pp_advantages(x, m), np.zeros((2, 3)), atol=0)  # single token: x - mean = 0
