"""KV-cache decoding: Decoder with a cache vs without, left padding, sampling, early exit, stop sequences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_code.models import Decoder, get_preset, init_cache, init_params
from fedjax_code.models import decode as D

BASE = dataclasses.replace(get_preset("cpu-0.25"), vocab_size=256, max_len=64)
CONFIGS = {
    "tied": BASE,
    "gqa": dataclasses.replace(BASE, d_model=32, n_heads=4, n_kv_heads=2),
    "untied": dataclasses.replace(BASE, tie_embeddings=False),
}
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
N_NEW = 10


def params_of(cfg, seed=0, scale=10.0):
    """Init params with kernels/embeddings scaled up so that greedy outputs vary (and logits have margins)."""
    p = init_params(cfg, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale if "kernel" in str(path) or "embedding" in str(path) else x, p)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    cfg = CONFIGS[request.param]
    return cfg, params_of(cfg)


def full_logits(cfg):
    return jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))


def greedy_reference(params, cfg, prompt, n):
    """Greedy decoding by full recomputation (right-padded to max_len; causal, so padding is inert)."""
    apply, seq = full_logits(cfg), list(prompt)
    for _ in range(n):
        x = np.zeros((1, cfg.max_len), np.int32)
        x[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(apply(params, jnp.asarray(x))[0, len(seq) - 1])))
    return seq[len(prompt):]


def cached_apply(cfg):
    """Jitted ``Decoder`` call with a cache: (params, tokens, positions, cache, index, mask) -> (logits, cache)."""
    return jax.jit(lambda p, t, pos, cache, i, mask: Decoder(cfg).apply({"params": p}, t, pos, cache, i, mask))


def test_cached_decoder_matches_decoder(model):
    cfg, params = model
    t = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, cfg.vocab_size, jnp.int32)
    ref = full_logits(cfg)(params, t)
    mask = D.attention_mask(jnp.zeros(2, jnp.int32), jnp.arange(20)[None], cfg.max_len)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    out, cache = cached_apply(cfg)(params, t, pos, init_cache(cfg, 2), 0, mask)
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert len(cache) == cfg.n_layers
    assert cache[0]["k"].shape == (2, cfg.max_len, cfg.n_kv_heads, cfg.head_dim)
    assert not np.any(np.asarray(cache[0]["k"][:, 20:]))  # only slots [0, 20) written


def test_decoder_with_cache_defaults_equal_decoder_without(model):
    """Cache index 0, default positions and the default (causal by slot) mask: the cache-free logits."""
    cfg, params = model
    t = jax.random.randint(jax.random.PRNGKey(5), (3, 24), 0, cfg.vocab_size, jnp.int32)
    out, cache = jax.jit(lambda p, x, c: Decoder(cfg).apply({"params": p}, x, cache=c))(params, t, init_cache(cfg, 3))
    np.testing.assert_allclose(out, full_logits(cfg)(params, t), rtol=1e-5, atol=1e-5)
    # ... and continuing from that cache at cache_index 24 equals the cache-free call on the longer sequence.
    more = jax.random.randint(jax.random.PRNGKey(6), (3, 5), 0, cfg.vocab_size, jnp.int32)
    step, _ = Decoder(cfg).apply({"params": params}, more, cache=cache, cache_index=24)
    ref = full_logits(cfg)(params, jnp.concatenate([t, more], axis=1))[:, 24:]
    np.testing.assert_allclose(step, ref, rtol=1e-4, atol=1e-4)


def test_logits_to_keep(model):
    """logits_to_keep=n gives the last n positions' logits, with or without a cache (prefill keeps 1)."""
    cfg, params = model
    t = jax.random.randint(jax.random.PRNGKey(7), (2, 12), 0, cfg.vocab_size, jnp.int32)
    ref = full_logits(cfg)(params, t)
    last3 = Decoder(cfg).apply({"params": params}, t, logits_to_keep=3)
    np.testing.assert_allclose(last3, ref[:, -3:], rtol=1e-5, atol=1e-5)
    last, _ = Decoder(cfg).apply({"params": params}, t, cache=init_cache(cfg, 2), logits_to_keep=1)
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(last, ref[:, -1:], rtol=1e-5, atol=1e-5)


def test_decoder_rejects_a_cache_that_does_not_fit():
    cfg = BASE
    params = params_of(cfg)
    t = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="cache"):
        Decoder(cfg).apply({"params": params}, t, cache=init_cache(cfg, 1, 4))
    with pytest.raises(ValueError, match="cache"):
        Decoder(cfg).apply({"params": params}, t, cache=init_cache(cfg, 1)[:-1])


def test_cached_decoder_bfloat16():
    cfg = dataclasses.replace(BASE, dtype="bfloat16")
    params = params_of(cfg, scale=1.0)
    t = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size, jnp.int32)
    mask = D.attention_mask(jnp.zeros(2, jnp.int32), jnp.arange(16)[None], cfg.max_len)
    out, cache = cached_apply(cfg)(params, t, jnp.broadcast_to(jnp.arange(16), (2, 16)), init_cache(cfg, 2), 0, mask)
    assert cache[0]["k"].dtype == jnp.bfloat16 and out.dtype == jnp.float32
    np.testing.assert_allclose(out, full_logits(cfg)(params, t), atol=0.05)


def test_prefill_then_cached_steps_match_full_recomputation(model):
    cfg, params = model
    seqs = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 20), 1, cfg.vocab_size, jnp.int32))
    lengths = [3, 7, 12]
    tokens, lens = D.pad_prompts([list(s[:n]) for s, n in zip(seqs, lengths)], 0, bucket=16)
    assert tokens.shape == (3, 16) and list(np.asarray(lens)) == lengths
    logits, cache = D.prefill(params, cfg, tokens, lens)
    refs = [np.asarray(full_logits(cfg)(params, jnp.asarray(s[None]))[0]) for s in seqs]
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(logits[b], refs[b][n - 1], rtol=1e-4, atol=1e-4)
    p = tokens.shape[1]
    start = p - lens
    for t in range(8):
        tok = jnp.asarray(np.array([s[n + t] for s, n in zip(seqs, lengths)], np.int32))[:, None]
        mask = D.attention_mask(start, jnp.full((1, 1), p + t), cfg.max_len)
        out, cache = cached_apply(cfg)(params, tok, (lens + t)[:, None], cache, p + t, mask)
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(out[b, 0], refs[b][n + t], rtol=1e-4, atol=1e-4)


def test_greedy_matches_recomputation_and_left_padding_is_inert(model):
    cfg, params = model
    rows, stats = D.generate_with_stats(params, cfg, PROMPTS, max_new_tokens=N_NEW, temperature=0.0, key=None,
                                        eos_id=None)
    assert stats["num_generated"] == N_NEW * len(PROMPTS) and stats["steps"] == N_NEW
    for prompt, row in zip(PROMPTS, rows):
        assert row == greedy_reference(params, cfg, prompt, N_NEW)
        assert D.generate(params, cfg, [prompt], max_new_tokens=N_NEW, eos_id=None) == [row]
    assert len({tuple(r) for r in rows}) == len(rows)  # outputs are not degenerate


def test_temperature_sampling_is_keyed():
    cfg, params = BASE, params_of(BASE, scale=1.0)  # near-uniform logits: samples vary a lot
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_p=1.0, eos_id=None)
    a = D.generate(params, cfg, PROMPTS, key=jax.random.PRNGKey(1), **kw)
    assert a == D.generate(params, cfg, PROMPTS, key=jax.random.PRNGKey(1), **kw)
    assert a != D.generate(params, cfg, PROMPTS, key=jax.random.PRNGKey(2), **kw)
    assert all(len(r) == N_NEW for r in a)


def test_tiny_top_p_equals_greedy():
    cfg, params = BASE, params_of(BASE)
    greedy = D.generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, temperature=0.0, eos_id=None)
    nucleus = D.generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6,
                         key=jax.random.PRNGKey(3), eos_id=None)
    assert nucleus == greedy


def test_nucleus_filter_keeps_smallest_top_set():
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(D.nucleus_filter(logits, p)))[0].tolist()
    assert kept(0.4) == [False, True, False]
    assert kept(0.7) == [False, True, True]
    assert kept(0.81) == [True, True, True]
    assert kept(1.0) == [True, True, True]


def test_nucleus_filter_matches_sorted_reference():
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(4), (4, 256))
    for top_p in (0.1, 0.5, 0.9, 0.99):
        probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
        order = np.argsort(-probs, axis=-1)
        desc = np.take_along_axis(probs, order, -1)
        k = np.sum(np.cumsum(desc, -1) - desc < top_p, -1)  # size of the smallest set reaching top_p
        got = np.isfinite(np.asarray(D.nucleus_filter(logits, top_p)))
        for b in range(4):
            assert set(np.flatnonzero(got[b])) == set(order[b, :k[b]])


@pytest.mark.parametrize("tied", [True, False])
def test_eos_stops_loop_after_one_step(tied):
    """Constant residual stream (o/down projections zeroed, all embeddings = ones) makes EOS dominate."""
    cfg, eos = dataclasses.replace(BASE, tie_embeddings=tied), 3
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "o_proj" in str(path) or "down_proj" in str(path) else x,
        init_params(cfg, jax.random.PRNGKey(0)))
    emb = jnp.ones_like(params["embed_tokens"]["embedding"])
    params["embed_tokens"]["embedding"] = emb.at[eos].set(2.0)
    if not tied:
        params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"]).at[:, eos].set(1.0)
    rows, stats = D.generate_with_stats(params, cfg, PROMPTS[:2], max_new_tokens=N_NEW, eos_id=eos, pad_id=0)
    assert stats["steps"] == 1 and stats["num_generated_per_row"] == [1, 1]
    assert rows == [[], []]  # the final EOS is dropped
    logits, cache = D.prefill(params, cfg, *D.pad_prompts(PROMPTS[:2], 0, 16))
    ids, num, steps = D.sample_loop(params, cfg, cache, logits, jnp.array([3, 9]), jnp.int32(16),
                                    jax.random.PRNGKey(0), jnp.float32(0), jnp.float32(1), jnp.int32(eos),
                                    jnp.int32(0), *D.stop_arrays(()), max_new_tokens=N_NEW)
    assert int(steps) == 1 and np.asarray(ids).tolist() == [[eos] + [0] * (N_NEW - 1)] * 2


def _cut_at_stop(generated, stops):
    """Expected output: generated ids up to and including the first completed stop sequence."""
    for i in range(len(generated)):
        if any(len(s) <= i + 1 and generated[i + 1 - len(s):i + 1] == list(s) for s in stops):
            return generated[:i + 1]
    return generated


def test_stop_sequences_end_rows():
    cfg, params = BASE, params_of(BASE)
    free = D.generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, eos_id=None)
    g0 = free[0]
    stops = [g0[3:5], [PROMPTS[1][-1], free[1][0]], [255, 254, 253]]  # 2nd spans the prompt: must not fire
    rows, stats = D.generate_with_stats(params, cfg, PROMPTS, max_new_tokens=N_NEW, eos_id=None,
                                        stop_token_seqs=stops)
    expected = [_cut_at_stop(g, stops) for g in free]
    assert rows == expected and len(rows[0]) <= 5
    assert stats["num_generated_per_row"] == [len(r) for r in expected]
    assert stats["steps"] == max(len(r) for r in expected)


def test_bucketing_shares_compiled_shapes():
    cfg = dataclasses.replace(BASE, max_len=48)  # a config no other test compiled
    params = params_of(cfg)
    a, _ = D.pad_prompts([list(range(1, 6))], 0, bucket=32)
    b, _ = D.pad_prompts([list(range(1, 10))], 0, bucket=32)
    assert a.shape == b.shape == (1, 32)
    D.generate(params, cfg, [list(range(1, 6))], max_new_tokens=8, eos_id=None, bucket=32)
    before = dict(D.TRACE_COUNTS)
    D.generate(params, cfg, [list(range(1, 10))], max_new_tokens=8, eos_id=None, bucket=32)
    assert dict(D.TRACE_COUNTS) == before
    D.generate(params, cfg, [list(range(1, 34))], max_new_tokens=8, eos_id=None, bucket=32)
    assert D.TRACE_COUNTS["prefill"] == before["prefill"] + 1  # a new bucket (40 = 48 - 8, capped)
    assert D.TRACE_COUNTS["sample_loop"] == before["sample_loop"]  # the loop does not depend on P


def test_pad_prompts_and_buckets():
    tokens, lengths = D.pad_prompts([[4, 5], [1, 2, 3]], pad_id=0, bucket=4)
    assert np.asarray(tokens).tolist() == [[0, 0, 4, 5], [0, 1, 2, 3]] and np.asarray(lengths).tolist() == [2, 3]
    assert tokens.dtype == jnp.int32
    assert [D.bucket_length(n, "pow2") for n in (1, 5, 8, 9)] == [1, 8, 8, 16]
    assert [D.bucket_length(n, 32) for n in (1, 32, 33)] == [32, 32, 64]
    assert D.bucket_length(7, None) == 7
    assert D.pad_prompts([[1] * 20], 0, bucket=32, max_len=24)[0].shape == (1, 24)
    with pytest.raises(ValueError):
        D.pad_prompts([[1] * 30], 0, bucket=32, max_len=24)
    with pytest.raises(ValueError):
        D.pad_prompts([[1], []], 0)
    with pytest.raises(ValueError):
        D.generate(params_of(BASE), BASE, [[1] * 60], max_new_tokens=10)


def test_truncate_completion():
    body = "    return a + b\n"
    assert D.truncate_completion(body + "\ndef g():\n    pass") == body
    assert D.truncate_completion(body + "\nif __name__ == '__main__':\n") == body
    assert D.truncate_completion(body + "\n# test\n\nclass A:") == body  # earliest stop wins
    assert D.truncate_completion(body + "\n```\n") == body
    assert D.truncate_completion(body + "\nprint(f(1))") == body
    indented = "    x = 1\n    # inner comment\n    if x:\n        return x"
    assert D.truncate_completion(indented) == indented  # only column-0 stops cut
    assert D.truncate_completion("    return 1") == "    return 1"
    assert D.truncate_completion("abcSTOPdef", stop_sequences=("STOP",)) == "abc"
