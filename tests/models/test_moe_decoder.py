"""The mixture of experts inside the decoder (Qwen3-MoE, Mixtral): per-layer MLP kinds, config
checks and parameter counts, router logits from every sparse layer (training forward, prefill
and each cached decode step route alike), the auxiliary load-balancing loss (its gradient
reaches the routers; parity with transformers' ``load_balancing_loss_func``; padding counts for
nothing), remat and one compiled program. HF import/export is in ``test_hf.py`` and
``test_hf_families.py``; ``MoEMLP`` itself in ``test_moe_mlp.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import PRESETS, ModelConfig, abstract_params, init_model, moe_aux_loss
from rlhf_jax.models.moe import load_balancing_loss, route

MOE = ModelConfig(family="qwen3_moe", vocab_size=97, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                  num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  norm_topk_prob=False, mlp_only_layers=(1,), router_aux_loss_coef=0.01)


@pytest.fixture(scope="module")
def moe():
    return init_model(MOE, jax.random.PRNGKey(0))


def _tokens(b, t, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 97)


# ---------------------------------------------------------------- config
def test_mlp_kinds_follow_qwen3_moe_rules():
    assert MOE.mlp_kinds() == ("moe", "dense", "moe")
    assert MOE.replace(mlp_only_layers=(), decoder_sparse_step=2,
                       num_layers=4).mlp_kinds() == ("dense", "moe", "dense", "moe")
    assert MOE.replace(num_experts=0).mlp_kinds() == ("dense",) * 3
    assert MOE.expert_size == 16 and MOE.replace(moe_intermediate_size=None).expert_size == 48


@pytest.mark.parametrize("bad", [dict(num_experts=-1), dict(num_experts_per_tok=5),
                                 dict(num_experts_per_tok=0), dict(moe_intermediate_size=0),
                                 dict(decoder_sparse_step=0), dict(mlp_only_layers=(3,)),
                                 dict(mlp_only_layers=[1]), dict(mlp_only_layers=(1, 1)),
                                 dict(router_aux_loss_coef=-0.1),
                                 dict(mlp_activation="gelu_tanh")])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        MOE.replace(**bad)


def test_params_and_counts(moe):
    _, params = moe
    assert set(params["layers"][0]["mlp"]) == {"router", "gate_proj", "up_proj", "down_proj"}
    assert params["layers"][0]["mlp"]["gate_proj"].shape == (4, 32, 16)
    assert params["layers"][1]["mlp"]["gate_proj"]["kernel"].shape == (32, 48)  # dense layer
    assert sum(x.size for x in jax.tree.leaves(params)) == MOE.num_params()


def test_moe_presets_are_as_named():
    qwen, mixtral = PRESETS["qwen3-30b-a3b"], PRESETS["mixtral-8x7b"]
    assert 30.0e9 < qwen.num_params() < 31.0e9 and 46.0e9 < mixtral.num_params() < 47.5e9
    assert set(qwen.mlp_kinds()) == set(mixtral.mlp_kinds()) == {"moe"}
    shapes = abstract_params(mixtral)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == mixtral.num_params()


# ---------------------------------------------------------------- router logits
def test_router_logits_are_the_sparse_layers_routers(moe):
    model, params = moe
    tok = _tokens(2, 5)
    out = jax.jit(model.apply)(params, tok)
    assert out.router_logits.shape == (2, 10, 4) and out.router_logits.dtype == jnp.float32
    # layer 0's logits are its router applied to its (post-attention-norm) MLP input
    module = model._module(params)
    x = module.embed(tok)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    from rlhf_jax.models.rope import inverse_frequencies
    from rlhf_jax.models.transformer import _masks
    allowed = _masks(MOE, pos, jnp.arange(5), jnp.ones((2, 5), bool), None, None)
    inv = inverse_frequencies(16, MOE.rope_theta, None)
    h, _ = module.layers[0].attn(module.layers[0].input_norm(x), pos, inv, allowed[False])
    mlp_in = module.layers[0].post_attn_norm(x + h).reshape(10, 32)
    np.testing.assert_allclose(out.router_logits[0],
                               mlp_in @ params["layers"][0]["mlp"]["router"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    dense, dparams = init_model(MOE.replace(num_experts=0), jax.random.PRNGKey(0))
    assert dense.apply(dparams, tok).router_logits is None
    assert float(moe_aux_loss(dense, dense.apply(dparams, tok), None)) == 0.0


def test_cached_decode_routes_like_the_full_forward(moe):
    """Prefill then one token at a time: each step's logits and router logits equal the
    full forward's at those positions (routing is per token)."""
    model, params = moe
    tok = _tokens(2, 9, seed=3)
    full = jax.jit(model.apply)(params, tok)
    step = jax.jit(lambda p, x, c: model.apply(p, x, cache=c))
    out = step(params, tok[:, :5], model.init_cache(2, 9))
    hidden, routers, cache = [out.hidden], [out.router_logits.reshape(2, 2, 5, 4)], out.cache
    for i in range(5, 9):
        out = step(params, tok[:, i:i + 1], cache)
        hidden.append(out.hidden)
        routers.append(out.router_logits.reshape(2, 2, 1, 4))
        cache = out.cache
    assert step._cache_size() == 2  # prefill shape + decode shape, not one per step
    np.testing.assert_allclose(jnp.concatenate(hidden, 1), full.hidden, atol=2e-5)
    np.testing.assert_allclose(jnp.concatenate(routers, 2).reshape(2, 18, 4),
                               full.router_logits, atol=2e-5)


# ---------------------------------------------------------------- auxiliary loss
def _router_kernel_grad(model, params, tok, mask):
    def loss(p):
        return moe_aux_loss(model, model.apply(p, tok, attention_mask=mask), mask)
    return jax.jit(jax.value_and_grad(loss))(params)


def test_aux_loss_matches_transformers_and_its_gradient_reaches_the_routers(moe):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    model, params = moe
    tok = _tokens(2, 6, seed=4)
    mask = jnp.ones((2, 6), bool).at[1, :2].set(False)  # left padding
    out = jax.jit(model.apply)(params, tok, attention_mask=mask)
    want = hf.load_balancing_loss_func(
        tuple(torch.from_numpy(np.array(z)) for z in out.router_logits), num_experts=4,
        top_k=2, attention_mask=torch.from_numpy(np.asarray(mask, np.int64)))
    aux = moe_aux_loss(model, out, mask)
    np.testing.assert_allclose(float(aux), 0.01 * float(want), rtol=1e-6)
    value, grads = _router_kernel_grad(model, params, tok, mask)
    np.testing.assert_allclose(float(value), float(aux), rtol=1e-6)
    for i in (0, 2):  # the sparse layers
        g = np.asarray(grads["layers"][i]["mlp"]["router"]["kernel"])
        assert np.all(np.isfinite(g)) and np.any(g != 0), i
    # the top-k counts are constants: the gradient is d/dz of E * sum_e f_e P_e only
    z = out.router_logits
    experts = route(z.reshape(-1, 4), top_k=2, norm_topk_prob=False)[1].reshape(2, 12, 2)
    gz = jax.grad(lambda z: 0.01 * load_balancing_loss(z, experts, mask.reshape(-1),
                                                       num_experts=4, top_k=2))(z)
    gz_aux = jax.grad(lambda z: moe_aux_loss(model, out._replace(router_logits=z), mask))(z)
    np.testing.assert_allclose(gz_aux, gz, rtol=1e-6, atol=1e-9)
    assert not np.any(np.asarray(gz_aux)[:, 6:8])  # row 1's two padding tokens: no gradient


def test_padding_counts_for_nothing(moe):
    """A left-padded row together with an unpadded one gives the aux loss of the real tokens:
    equal to the loss over both rows' real tokens computed without padding."""
    model, params = moe
    a, b = _tokens(1, 6, seed=5), _tokens(1, 4, seed=6)
    padded = jnp.concatenate([a, jnp.pad(b, ((0, 0), (2, 0)))])
    mask = jnp.ones((2, 6), bool).at[1, :2].set(False)
    apply = jax.jit(model.apply)  # eager dispatch of three forwards is slow
    got = moe_aux_loss(model, apply(params, padded, attention_mask=mask), mask)
    za, zb = apply(params, a).router_logits, apply(params, b).router_logits
    z = jnp.concatenate([za, zb], axis=1)  # [L_moe, 10, E]: the 10 real tokens
    experts = route(z.reshape(-1, 4), top_k=2, norm_topk_prob=False)[1].reshape(2, 10, 2)
    want = 0.01 * load_balancing_loss(z, experts, num_experts=4, top_k=2)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_remat_gives_the_same_gradients(moe):
    model, params = moe
    remat, _ = init_model(MOE.replace(remat=True), jax.random.PRNGKey(0))
    tok = _tokens(2, 5, seed=7)

    def loss(m):
        def f(p):
            out = m.apply(p, tok)
            return jnp.mean(m.logits(p, out.hidden) ** 2) + moe_aux_loss(m, out, None)
        return jax.jit(jax.grad(f))(params)

    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                 loss(model), loss(remat))


def test_sampler_logprobs_equal_the_trainers_on_a_moe_model(moe):
    """The jitted sampler (prefill + a ``while_loop`` of cached decode steps) on a mixture of
    experts: its log-probs equal ``score_completions``' teacher-forced ones, left padding
    included (routing per decode step is the training forward's)."""
    from rlhf_jax.models import score_completions
    from rlhf_jax.sampling import SamplingConfig, make_sampler
    model, params = moe
    prompts = _tokens(2, 5, seed=8).at[1, :2].set(0)
    mask = jnp.ones((2, 5), bool).at[1, :2].set(False)
    cfg = SamplingConfig(max_new_tokens=6, eos_ids=(96,), pad_id=0, temperature=1.0)
    out = make_sampler(model, cfg)(params, prompts, mask, jax.random.PRNGKey(9))
    scores = jax.jit(lambda p: score_completions(model, p, out.prompt_tokens, out.prompt_mask,
                                                 out.tokens, out.mask))(params)
    np.testing.assert_allclose(scores.logprobs, out.logprobs, atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_forward_and_aux_gradient_equal_one_device(moe, shape):
    """Params placed by ``parallel.param_shardings`` (the ``MOE_RULES + RULES`` table: experts
    over ``fsdp``, their hidden over ``tensor``), batch over data x fsdp: the logits, the aux
    loss and its gradient equal the single-device ones."""
    from rlhf_jax.parallel import batch_spec, param_shardings, shard_params
    from tests.parallel.common import mesh_for
    from jax.sharding import NamedSharding
    model, params = moe
    mesh = mesh_for(shape)
    tok = _tokens(4, 6, seed=10)
    mask = jnp.ones((4, 6), bool).at[1, :3].set(False)

    def f(p, tok, mask):
        out = model.apply(p, tok, attention_mask=mask)
        return model.logits(p, out.hidden), moe_aux_loss(model, out, mask)

    fn = jax.jit(lambda p, t, m: (f(p, t, m), jax.grad(lambda q: f(q, t, m)[1])(p)))
    (logits, aux), grads = fn(params, tok, mask)
    batch = NamedSharding(mesh, batch_spec(mesh))
    (s_logits, s_aux), s_grads = fn(shard_params(params, param_shardings(MOE, params, mesh)),
                                    jax.device_put(tok, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(s_logits, logits, atol=2e-5)
    np.testing.assert_allclose(float(s_aux), float(aux), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8),
                 s_grads, grads)
