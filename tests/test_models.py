"""The Llama-style decoder, its config/scaling rule, presets and analytic counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_code.models import (
    CPU_BASE, GPU_BASE, PRESETS, Decoder, ModelConfig, flops_per_token, format_ladder, get_preset,
    init_params, loss_fn, model_info, num_params, param_count, rope, scale,
)
from fedjax_code.models.decoder import tied_logits

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=32,
                   tie_embeddings=False)
T = 16
jloss = jax.jit(loss_fn, static_argnums=1)  # ModelConfig is frozen, hence hashable and static


def tiny(**kw):
    return dataclasses.replace(TINY, **kw)


def params_of(cfg, seed=0):
    return init_params(cfg, jax.random.PRNGKey(seed))


def apply_fn(cfg):
    return jax.jit(lambda p, x, pos=None: Decoder(cfg).apply({"params": p}, x, pos))


def tokens(cfg, b=2, t=T, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, cfg.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def tiny_params():
    return params_of(TINY)


def test_output_shape_and_dtype(tiny_params):
    logits = apply_fn(TINY)(tiny_params, tokens(TINY))
    assert logits.shape == (2, T, TINY.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_param_names_follow_llama(tiny_params):
    assert set(tiny_params) == {"embed_tokens", "layers_0", "layers_1", "norm", "lm_head"}
    layer = tiny_params["layers_0"]
    assert set(layer) == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(tiny_params))


def test_causality(tiny_params):
    x = tokens(TINY)
    t = 6
    y = x.at[:, t + 1:].set((x[:, t + 1:] + 7) % TINY.vocab_size)
    f = apply_fn(TINY)
    a, b = f(tiny_params, x), f(tiny_params, y)
    np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
    assert float(jnp.abs(a[:, t + 1:] - b[:, t + 1:]).max()) > 1e-3


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 1, 16))

    def score(m, n):
        return float(jnp.sum(rope(q, jnp.array([[m]]), 10000.0) * rope(k, jnp.array([[n]]), 10000.0)))

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    np.testing.assert_allclose(rope(q, jnp.array([[0]]), 10000.0), q)  # position 0 is the identity


def sharpen(params, factor=10.0):
    """Scale q/k kernels so attention is far from uniform (position effects are tiny at init)."""
    return {k: ({**v, "self_attn": {n: {"kernel": w["kernel"] * (factor if n in ("q_proj", "k_proj") else 1)}
                                    for n, w in v["self_attn"].items()}} if k.startswith("layers_") else v)
            for k, v in params.items()}


def test_positions_argument(tiny_params):
    x, f, p = tokens(TINY), apply_fn(TINY), sharpen(tiny_params)
    base = f(p, x)
    np.testing.assert_allclose(f(p, x, jnp.arange(T)), base, atol=1e-6)
    # Only relative positions matter: a constant shift (either [T] or [B,T]) leaves logits unchanged.
    np.testing.assert_allclose(f(p, x, jnp.arange(T) + 11), base, atol=1e-4)
    np.testing.assert_allclose(f(p, x, jnp.tile(jnp.arange(T) + 3, (2, 1))), base, atol=1e-4)
    assert float(jnp.abs(f(p, x, 2 * jnp.arange(T)) - base).max()) > 1e-2


def test_gqa_runs_has_fewer_params_and_equals_repeated_kv_mha():
    gqa = tiny(n_kv_heads=1)
    p = params_of(gqa)
    assert p["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (32, gqa.head_dim)
    assert num_params(p) < num_params(params_of(TINY))
    # Repeating the single kv head's weights for every query head gives the equivalent MHA model.
    mha_p = jax.tree_util.tree_map(lambda a: a, p)
    for i in range(gqa.n_layers):
        attn = mha_p[f"layers_{i}"]["self_attn"]
        for name in ("k_proj", "v_proj"):
            attn[name] = {"kernel": jnp.tile(attn[name]["kernel"], (1, gqa.n_heads))}
    x = tokens(gqa)
    np.testing.assert_allclose(apply_fn(gqa)(p, x), apply_fn(TINY)(mha_p, x), atol=1e-5)


def test_tied_embeddings_have_no_lm_head_and_fewer_params(tiny_params):
    tied = tiny(tie_embeddings=True)
    p = params_of(tied)
    assert "lm_head" not in p and tiny_params["lm_head"]["kernel"].shape == (32, 64)
    assert num_params(tiny_params) - num_params(p) == TINY.vocab_size * TINY.d_model
    logits = apply_fn(tied)(p, tokens(tied))
    assert logits.shape == (2, T, 64)


def test_tied_logits_gradient_equals_autodiff_of_the_plain_product():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
    emb = jax.random.normal(jax.random.PRNGKey(1), (64, 32))
    labels = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 64)

    def ce(logits_fn):
        return lambda x, e: optax.softmax_cross_entropy_with_integer_labels(logits_fn(x, e), labels).mean()

    ours = jax.grad(ce(tied_logits), argnums=(0, 1))(x, emb)
    plain = jax.grad(ce(lambda x, e: x @ e.T), argnums=(0, 1))(x, emb)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_tied_model_gradient_equals_untied_model_with_shared_weights():
    """The tied model's embedding gradient is the sum of the lookup's and the head's: the untied model
    with lm_head = embedding^T gives the same loss, and its two gradients add up to the tied one."""
    tied = tiny(tie_embeddings=True)
    p = params_of(tied)
    untied_p = {**p, "lm_head": {"kernel": p["embed_tokens"]["embedding"].T}}
    batch = tokens(tied, t=T + 1)
    loss_t, g_t = jax.value_and_grad(loss_fn)(p, tied, batch)
    loss_u, g_u = jax.value_and_grad(loss_fn)(untied_p, TINY, batch)
    np.testing.assert_allclose(loss_t, loss_u, rtol=1e-6)
    np.testing.assert_allclose(g_t["embed_tokens"]["embedding"],
                               g_u["embed_tokens"]["embedding"] + g_u["lm_head"]["kernel"].T, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cfg", [TINY, tiny(tie_embeddings=True), tiny(n_kv_heads=2), tiny(n_kv_heads=1, n_layers=3),
                                 tiny(n_heads=2, n_kv_heads=1, d_ff=48, tie_embeddings=True)])
def test_param_count_matches_initialised_pytree(cfg):
    counts = param_count(cfg)
    p = params_of(cfg)
    assert counts["params_total"] == num_params(p)
    vocab = sum(int(p[k]["embedding" if k == "embed_tokens" else "kernel"].size)
                for k in ("embed_tokens", "lm_head") if k in p)
    assert counts["params_non_embedding"] == num_params(p) - vocab


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_preset_shapes(name):
    cfg = get_preset(name)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0))
    assert num_params(shapes) == param_count(cfg)["params_total"]


@pytest.mark.parametrize("prefix", ["cpu", "gpu"])
def test_ladder_grows_strictly(prefix):
    names = [f"{prefix}-{f}" for f in ("0.25", "0.5", "1", "2", "4")]
    cfgs = [get_preset(n) for n in names]
    for key in ("params_total", "params_non_embedding"):
        sizes = [param_count(c)[key] for c in cfgs]
        assert sizes == sorted(set(sizes))
    flops = [flops_per_token(c) for c in cfgs]
    assert flops == sorted(set(flops))
    assert len({c.head_dim for c in cfgs}) == 1  # the rule keeps head_dim fixed
    assert all(c.n_heads // c.n_kv_heads == cfgs[2].n_heads // cfgs[2].n_kv_heads or c.n_kv_heads == 1
               for c in cfgs)
    print("\n" + format_ladder(names))


def test_scale_rule():
    for base in (CPU_BASE, GPU_BASE, tiny(n_kv_heads=2)):
        assert scale(base, 1.0) == base
    assert get_preset("cpu-1") == CPU_BASE and get_preset("gpu-1") == GPU_BASE
    big = scale(CPU_BASE, 2.0)
    assert (big.d_model, big.n_heads, big.n_layers) == (256, 8, 6) and big.d_ff % 8 == 0
    assert big.vocab_size == CPU_BASE.vocab_size and big.max_len == CPU_BASE.max_len
    factors = np.linspace(0.1, 5.0, 40)
    sizes = [param_count(scale(CPU_BASE, f))["params_total"] for f in factors]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    with pytest.raises(ValueError):
        scale(CPU_BASE, 0.0)


def test_bf16_compute_close_to_fp32(tiny_params):
    bf = tiny(dtype="bfloat16")
    p = params_of(bf)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))
    x = tokens(TINY)
    a, b = apply_fn(TINY)(tiny_params, x), apply_fn(bf)(tiny_params, x)
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.05
    assert np.corrcoef(np.ravel(a), np.ravel(b))[0, 1] > 0.99
    batch = tokens(TINY, t=T + 1)
    assert float(jloss(tiny_params, bf, batch)) == pytest.approx(float(jloss(tiny_params, TINY, batch)), abs=0.02)


def test_loss_at_init_is_log_vocab(tiny_params):
    batch = tokens(TINY, b=4, t=T + 1)
    assert float(jloss(tiny_params, TINY, batch)) == pytest.approx(math.log(TINY.vocab_size), abs=0.1)


def test_loss_mask(tiny_params):
    batch = tokens(TINY, t=T + 1)
    logits = apply_fn(TINY)(tiny_params, batch[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    mask = jnp.zeros((2, T)).at[0, :5].set(1).at[1, 3].set(1)
    assert float(jloss(tiny_params, TINY, batch, mask)) == pytest.approx(float(ce[mask > 0].mean()), rel=1e-5)
    assert float(jloss(tiny_params, TINY, batch, jnp.ones((2, T)))) == pytest.approx(float(ce.mean()), rel=1e-5)


def test_adam_steps_reduce_loss(tiny_params):
    batch = tokens(TINY, b=4, t=T + 1)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p, TINY, batch)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p, s = tiny_params, opt.init(tiny_params)
    losses = []
    for _ in range(15):
        p, s, loss = step(p, s)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0


def test_vmap_over_stacked_params():
    p0, p1 = params_of(TINY, 0), params_of(TINY, 1)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), p0, p1)
    x = jnp.stack([tokens(TINY, seed=2), tokens(TINY, seed=3)])
    f = lambda p, t: Decoder(TINY).apply({"params": p}, t)
    out = jax.jit(jax.vmap(f))(stacked, x)
    np.testing.assert_allclose(out[0], f(p0, x[0]), atol=1e-5)
    np.testing.assert_allclose(out[1], f(p1, x[1]), atol=1e-5)
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3


@pytest.mark.parametrize("kw", [dict(d_model=30), dict(n_kv_heads=3), dict(n_layers=0), dict(vocab_size=-1),
                                dict(dtype="float16"), dict(d_model=36, n_heads=4), dict(rope_theta=0.0)])
def test_invalid_config_raises(kw):
    with pytest.raises(ValueError):
        tiny(**kw)


def test_unknown_preset_and_long_input():
    with pytest.raises(ValueError, match="cpu-0.25"):
        get_preset("cpu-3")
    with pytest.raises(ValueError, match="max_len"):
        Decoder(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, TINY.max_len + 1), jnp.int32))


def test_model_info_and_flops():
    info = model_info(CPU_BASE)
    counts = param_count(CPU_BASE)
    assert info["params_total"] == counts["params_total"] and info["n_kv_heads"] == CPU_BASE.n_kv_heads
    assert info["size_mb"] == {"fp32": counts["params_total"] * 4 / 1e6, "bf16": counts["params_total"] * 2 / 1e6}
    c = TINY
    n = param_count(c)["params_non_embedding"] + c.d_model * c.vocab_size
    assert flops_per_token(c, seq_len=8) == 6 * n + 12 * c.n_layers * 8 * c.d_model
    assert flops_per_token(c) == flops_per_token(c, seq_len=c.max_len)


@pytest.mark.parametrize("name", ["cpu-0.5", "cpu-1"])
def test_flops_per_token_matches_xla_cost_analysis(name):
    """The analytic count of matmul FLOPs agrees with XLA's count for the compiled gradient, which
    also counts the elementwise work (softmax, norms, RoPE): at most a few percent more."""
    cfg, t = get_preset(name), 64
    params, batch = init_params(cfg, jax.random.PRNGKey(0)), jnp.zeros((2, t + 1), jnp.int32)
    cost = jax.jit(jax.grad(lambda p, b: loss_fn(p, cfg, b))).lower(params, batch).compile().cost_analysis()
    xla_per_token = (cost[0] if isinstance(cost, list) else cost)["flops"] / (2 * t)
    assert 0.97 * xla_per_token <= flops_per_token(cfg, t) <= xla_per_token
