"""KV-cache decoding: Decoder with a cache vs without, left padding, the continuous-batching sampler (slots,
windows, reproducible keys, resumption), nucleus sampling's distribution, early exit, stop sequences."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from fedjax_code.models import Decoder, get_preset, init_cache, init_params
from fedjax_code.models import decode as D
from fedjax_code.models import sampling as S

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
    assert cache[0]["k"].shape == (2, cfg.n_kv_heads, cfg.head_dim, cfg.max_len)
    assert cache[0]["v"].shape == (2, cfg.n_kv_heads, cfg.max_len, cfg.head_dim)
    assert not np.any(np.asarray(cache[0]["k"][..., 20:]))  # only positions [0, 20) written
    assert not np.any(np.asarray(cache[0]["v"][:, :, 20:]))


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
    cache = D.resize(D.Slots(cache, *([None] * 7)), cfg.max_len).cache  # room for the steps after the prompt
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
    rows, stats = D.generate_with_stats(params, cfg, PROMPTS, max_new_tokens=N_NEW, temperature=0.0, eos_id=None)
    assert stats["num_generated"] == N_NEW * len(PROMPTS) and stats["steps"] == N_NEW
    for prompt, row in zip(PROMPTS, rows):
        assert row == greedy_reference(params, cfg, prompt, N_NEW)
        assert D.generate(params, cfg, [prompt], max_new_tokens=N_NEW, eos_id=None) == [row]
    assert len({tuple(r) for r in rows}) == len(rows)  # outputs are not degenerate


def test_temperature_sampling_is_keyed():
    cfg, params = BASE, params_of(BASE, scale=1.0)  # near-uniform logits: samples vary a lot
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_p=1.0, eos_id=None)
    a = D.generate(params, cfg, PROMPTS, seed=1, **kw)
    assert a == D.generate(params, cfg, PROMPTS, seed=1, **kw)
    assert a != D.generate(params, cfg, PROMPTS, seed=2, **kw)
    assert all(len(r) == N_NEW for r in a)


def test_tiny_top_p_equals_greedy():
    cfg, params = BASE, params_of(BASE)
    greedy = D.generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, temperature=0.0, eos_id=None)
    nucleus = D.generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, temperature=1.0, top_p=1e-6,
                         seed=3, eos_id=None)
    assert nucleus == greedy


def test_nucleus_filter_keeps_smallest_top_set():
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(S.nucleus_filter(logits, p)))[0].tolist()
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
        got = np.isfinite(np.asarray(S.nucleus_filter(logits, top_p)))
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
    streamed = D.sample_stream(params, cfg, PROMPTS[:2], 2, max_new_tokens=N_NEW, eos_id=eos)
    assert sorted(streamed) == [(i, j, [eos]) for i in range(2) for j in range(2)]  # the stream keeps it


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


def test_one_compile_per_window_not_per_prompt_width():
    cfg = dataclasses.replace(BASE, max_len=160)  # a config no other test compiled
    params = params_of(cfg)
    D.generate(params, cfg, [list(range(1, 6))], max_new_tokens=8, eos_id=None)
    before = dict(D.TRACE_COUNTS)
    D.generate(params, cfg, [list(range(1, 40))], max_new_tokens=8, eos_id=None)  # same prompt bucket and window
    assert dict(D.TRACE_COUNTS) == before
    D.generate(params, cfg, [list(range(1, 100))], max_new_tokens=8, eos_id=None)  # bucket 128: a wider window
    assert D.TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert D.TRACE_COUNTS["decode_segment"] == before["decode_segment"] + 1
    assert [D.window_length(n) for n in (1, 128, 129, 193, 257, 600)] == [128, 128, 192, 256, 320, 640]


def test_samples_do_not_depend_on_slots_neighbours_or_window():
    """Sample j of prompt i is drawn from (seed, i, j) alone: 1, 3 or 8 slots (other neighbours, refills and
    cache windows) give the same completions, and prompts of different widths share a window."""
    cfg, params = BASE, params_of(BASE, scale=1.0)
    prompts = PROMPTS + [list(range(30, 70))]  # a wider prompt bucket beside the short ones
    kw = dict(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, seed=5, eos_id=7)
    runs = [sorted(D.sample_stream(params, cfg, prompts, 3, slots=s, **kw)) for s in (1, 3, 8)]
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 12 and len({tuple(r[2]) for r in runs[0]}) > 6  # samples differ from each other
    assert sorted(D.sample_stream(params, cfg, prompts, 3, slots=3, **{**kw, "seed": 6})) != runs[0]


def test_skipped_samples_resume_to_the_uninterrupted_run():
    cfg, params = BASE, params_of(BASE, scale=1.0)
    kw = dict(max_new_tokens=N_NEW, temperature=0.8, top_p=0.95, seed=2)
    whole = sorted(D.sample_stream(params, cfg, PROMPTS, 4, slots=5, **kw))
    first = set((i, j) for i, j, _ in whole[::3])
    rest = sorted(D.sample_stream(params, cfg, PROMPTS, 4, slots=2, skip=first, **kw))
    assert rest == [x for x in whole if (x[0], x[1]) not in first]


def _nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Reference: softmax restricted to the smallest top set with mass >= top_p, renormalised (float64, sorted)."""
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind="stable")
    desc = probs[order]
    kept = order[np.cumsum(desc) - desc < top_p]
    out = np.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("top_k", [16, 3])  # 16: the cut holds the nucleus; 3: it does not (the full pass)
def test_sampled_frequencies_match_the_nucleus(top_k):
    """Chi-square goodness of fit of 20,000 draws (fixed seed) against softmax(logits / T) on the nucleus."""
    temperature, top_p, draws = 0.7, 0.9, 20_000
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (64,))) * 2.0
    expected = _nucleus(logits / temperature, top_p)
    assert 3 < np.count_nonzero(expected) <= 16  # so that top_k=3 cannot hold the nucleus and 16 can
    keys = jax.random.split(jax.random.PRNGKey(1), draws)
    tokens = jax.jit(lambda k: S.sample_tokens(jnp.broadcast_to(jnp.asarray(logits), (draws, 64)), k,
                                               jnp.float32(temperature), jnp.float32(top_p), top_k=top_k))(keys)
    counts = np.bincount(np.asarray(tokens), minlength=64)
    assert not counts[expected == 0].any()  # nothing outside the nucleus
    support = expected > 0
    assert scipy_stats.chisquare(counts[support], draws * expected[support]).pvalue > 1e-3


def test_cut_and_full_pass_rows_mix():
    """Rows whose nucleus the top-k holds and rows it does not, in one batch: each row keeps to its nucleus."""
    peaked, flat = np.zeros(64), np.zeros(64)
    peaked[7] = 10.0
    tokens = np.asarray(S.sample_tokens(jnp.asarray(np.stack([peaked, flat] * 8)), jax.random.split(
        jax.random.PRNGKey(3), 16), jnp.float32(1.0), jnp.float32(0.95), top_k=4))
    assert (tokens[0::2] == 7).all() and len(set(tokens[1::2])) > 2


def test_first_token_of_the_sampler_follows_the_models_distribution():
    """Through the whole sampler on a tiny model: 4,000 one-token samples of a prompt match softmax(logits / T)
    restricted to the nucleus (chi-square, fixed seed)."""
    cfg, params = BASE, params_of(BASE, scale=3.0)
    temperature, top_p = 0.8, 0.9
    logits = np.asarray(full_logits(cfg)(params, jnp.asarray([PROMPTS[1]]))[0, -1], np.float64)
    expected = _nucleus(logits / temperature, top_p)
    samples = D.sample_stream(params, cfg, [PROMPTS[1]], 4000, max_new_tokens=1, temperature=temperature,
                              top_p=top_p, seed=11)
    counts = np.bincount([ids[0] for *_, ids in samples], minlength=cfg.vocab_size)
    assert not counts[expected == 0].any() and np.count_nonzero(expected) > 2
    support = expected > 0
    assert scipy_stats.chisquare(counts[support], 4000 * expected[support]).pvalue > 1e-3


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
