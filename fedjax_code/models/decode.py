"""KV-cache sampling for the Llama-style decoder, after the Gemma sampler design (google-deepmind/gemma,
``gemma/sampler.py``): a preallocated per-layer cache, a jitted prefill of left-padded prompts and a
jitted ``lax.while_loop`` that emits one token per step and stops early once every row has finished.

Prefill and every loop step run ``Decoder(config).apply(..., cache, cache_index, attn_mask)``, the module
that is trained (``decoder.py`` defines the cache layout and ``init_cache``). Prompts are left-padded to a
bucketed width P, so every row's last prompt token sits in cache slot P-1 and generated token t is written
to slot P+t (the end index). Row b's real tokens start at slot ``P - lengths[b]``; the attention mask is
``start_b <= key <= query`` (causal + padding) over the whole cache, and RoPE positions count from 0 at each
row's first real token, so a row decodes exactly as it would alone. The loop's carry is a
``SamplingState``. Sampling: greedy (temperature 0), temperature and nucleus (top-p, Holtzman et al.
2020). Stop sequences (token ids) are matched each step against a fixed window of the last few generated ids.
"""

from __future__ import annotations

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from fedjax_code.models.decoder import Decoder, init_cache
from fedjax_code.models.scales import ModelConfig

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
TRACE_COUNTS: collections.Counter = collections.Counter()  # bumped only while tracing (compile counter)
_SENTINEL = -1  # fills the stop-window before the first generated token; never a token id


def attention_mask(start: jax.Array, query_slots: jax.Array, cache_len: int) -> jax.Array:
    """Bool [B,S,cache_len]: query at slot q of row b sees key slots start[b] <= s <= q."""
    keys = jnp.arange(cache_len)[None, None, :]
    query_slots = jnp.broadcast_to(query_slots, (start.shape[0], query_slots.shape[-1]))
    return (keys <= query_slots[:, :, None]) & (keys >= start[:, None, None])


# ----------------------------------------------------------------------------- prompts and prefill

def bucket_length(n: int, bucket: int | str | None = 32) -> int:
    """Round n up: to a multiple of ``bucket`` (int), to a power of two (``"pow2"``), or not (None/0)."""
    if bucket == "pow2":
        return 1 << max(0, n - 1).bit_length()
    return n if not bucket else -(-n // bucket) * bucket


def pad_prompts(prompts, pad_id: int = 0, bucket: int | str | None = 32, max_len: int | None = None):
    """Left-pad token lists to a bucketed width (capped at max_len) -> (tokens [B,P] int32, lengths [B])."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    width = bucket_length(max(lengths), bucket)
    if max_len is not None:
        if max(lengths) > max_len:
            raise ValueError(f"prompt of {max(lengths)} tokens exceeds the {max_len} available")
        width = min(width, max_len)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in zip(tokens, prompts):
        row[width - len(p):] = p
    return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def prefill(params, config: ModelConfig, tokens, lengths, cache_len: int | None = None):
    """Run left-padded prompts [B,P] through a fresh cache -> (logits of each row's last token [B,V], cache)."""
    TRACE_COUNTS["prefill"] += 1
    b, p = tokens.shape
    cache = init_cache(config, b, cache_len)
    start, slots = p - lengths, jnp.arange(p)
    positions = jnp.maximum(slots[None, :] - start[:, None], 0)
    mask = attention_mask(start, slots[None, :], cache[0]["k"].shape[1])
    logits, cache = Decoder(config).apply({"params": params}, tokens, positions, cache, 0, mask, logits_to_keep=1)
    return logits[:, 0], cache


# ----------------------------------------------------------------------------- sampling loop

def nucleus_filter(logits, top_p, iters: int = 32):
    """Keep the smallest top set of tokens whose probability mass reaches top_p (Holtzman et al. 2020).

    The probability threshold is found by bisection (largest t with mass(p >= t) >= top_p) instead of
    sorting the vocabulary, which costs ~10 ms per step on XLA:CPU; ties at the threshold are all kept.
    """
    probs = jax.nn.softmax(logits, axis=-1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = jnp.sum(jnp.where(probs >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(probs.shape[:-1] + (1,), probs.dtype)
    lo, _ = lax.fori_loop(0, iters, halve, (lo, jnp.max(probs, axis=-1, keepdims=True) * 1.001))
    return jnp.where(probs >= lo, logits, -jnp.inf)


def sample_token(logits, key, temperature, top_p):
    """Token ids [B] from logits [B,V]: argmax if temperature <= 0, else temperature + top-p sampling."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    scaled = lax.cond(top_p < 1.0, nucleus_filter, lambda x, _: x, scaled, top_p)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def stop_arrays(stop_token_seqs) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned stop sequences [N,W] int32 and their validity mask [N,W] (W = longest, >= 1)."""
    seqs = [list(s) for s in stop_token_seqs if len(s)]
    width = max([1] + [len(s) for s in seqs])
    ids, valid = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):], valid[i, width - len(s):] = s, True
    return ids, valid


def _stop_hit(window, stop_ids, stop_valid):
    """[B] bool: the window [B,W] of last generated ids ends with some stop sequence."""
    eq = (window[:, None, :] == stop_ids[None]) | ~stop_valid[None]
    return jnp.any(jnp.all(eq, axis=-1), axis=-1)


@struct.dataclass
class SamplingState:
    """The carry of ``sample_loop``'s ``lax.while_loop`` (B rows, W stop-window width, N max new tokens)."""

    step: jax.Array  # [] int32: tokens sampled so far
    done: jax.Array  # [B] bool: the row emitted EOS or ended a stop sequence
    num: jax.Array  # [B] int32: tokens generated per row (a final EOS counted)
    buf: jax.Array  # [B, W-1+N] int32: W-1 sentinels, then the generated ids (pad_id once done)
    logits: jax.Array  # [B, V] float32: logits of the next token
    cache: list  # n_layers x {"k", "v"} [B, L, n_kv_heads, head_dim] compute dtype


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def sample_loop(params, config: ModelConfig, cache, logits, lengths, prompt_len, key, temperature, top_p,
                eos_id, pad_id, stop_ids, stop_valid, *, max_new_tokens: int):
    """Decode up to max_new_tokens after ``prefill``; returns (ids [B,N], num_generated [B], steps).

    Each step samples from the current logits (key folded with the step), records the token, marks rows
    that emitted ``eos_id`` or ended a stop sequence as done (later slots hold ``pad_id``), then feeds the
    token through the cache at slot prompt_len + step. Exits once every row is done.
    """
    TRACE_COUNTS["sample_loop"] += 1
    b, w = logits.shape[0], stop_ids.shape[1]
    start, cache_len = prompt_len - lengths, cache[0]["k"].shape[1]
    cols = jnp.arange(w - 1 + max_new_tokens)
    buf = jnp.broadcast_to(jnp.where(cols < w - 1, _SENTINEL, pad_id), (b, cols.shape[0])).astype(jnp.int32)
    model = Decoder(config)

    def feed(tok, step, cache):
        mask = attention_mask(start, (prompt_len + step)[None, None], cache_len)
        out, cache = model.apply({"params": params}, tok[:, None], (lengths + step)[:, None], cache,
                                 prompt_len + step, mask)
        return out[:, 0], cache

    def body(s: SamplingState) -> SamplingState:
        tok = jnp.where(s.done, pad_id, sample_token(s.logits, jax.random.fold_in(key, s.step), temperature, top_p))
        buf = lax.dynamic_update_slice(s.buf, tok[:, None], (0, w - 1 + s.step))
        window = lax.dynamic_slice(buf, (0, s.step), (b, w))
        finished = s.done | (tok == eos_id) | _stop_hit(window, stop_ids, stop_valid)
        more = ~jnp.all(finished) & (s.step + 1 < max_new_tokens)
        new_logits, new_cache = lax.cond(more, lambda c: feed(tok, s.step, c), lambda c: (s.logits, c), s.cache)
        return SamplingState(step=s.step + 1, done=finished, num=s.num + (~s.done).astype(jnp.int32), buf=buf,
                             logits=new_logits, cache=new_cache)

    def cond(s: SamplingState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    init = SamplingState(step=jnp.int32(0), done=jnp.zeros((b,), bool), num=jnp.zeros((b,), jnp.int32), buf=buf,
                         logits=logits, cache=list(cache))
    s = lax.while_loop(cond, body, init)
    return s.buf[:, w - 1:], s.num, s.step


# ----------------------------------------------------------------------------- host API

def generate_with_stats(params, config: ModelConfig, prompts, *, max_new_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, key=None, eos_id: int | None = None, pad_id: int = 0,
                        stop_token_seqs=(), bucket: int | str | None = 32):
    """``generate`` plus a stats dict: num_generated (total and per row, EOS counted), steps, prefill_s,
    decode_s and decode_tokens_per_s (timings include compilation on a shape's first call)."""
    if max_new_tokens < 1 or max_new_tokens >= config.max_len:
        raise ValueError(f"max_new_tokens must be in [1, {config.max_len}), not {max_new_tokens}")
    tokens, lengths = pad_prompts(prompts, pad_id, bucket, max_len=config.max_len - max_new_tokens)
    stop_ids, stop_valid = stop_arrays(stop_token_seqs)
    key = jax.random.PRNGKey(0) if key is None else key
    eos = -1 if eos_id is None else eos_id
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(params, config, tokens, lengths))
    t1 = time.perf_counter()
    ids, num, steps = jax.block_until_ready(sample_loop(
        params, config, cache, logits, lengths, jnp.int32(tokens.shape[1]), key, jnp.float32(temperature),
        jnp.float32(top_p), jnp.int32(eos), jnp.int32(pad_id), stop_ids, stop_valid, max_new_tokens=max_new_tokens))
    t2 = time.perf_counter()
    ids, num = np.asarray(ids), np.asarray(num)
    rows = [[int(t) for t in r[:n]] for r, n in zip(ids, num)]
    rows = [r[:-1] if r and r[-1] == eos else r for r in rows]
    total = int(num.sum())
    return rows, {"num_generated": total, "num_generated_per_row": num.tolist(), "steps": int(steps),
                  "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens_per_s": total / max(t2 - t1, 1e-9)}


def generate(params, config: ModelConfig, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, key=None, eos_id: int | None = None, pad_id: int = 0, stop_token_seqs=(),
             bucket: int | str | None = 32) -> list[list[int]]:
    """Completions (token ids, final EOS dropped, stop-sequence ids kept) of token-id prompts.

    Use ``generate_with_stats`` for token counts and timings (decode tokens/s).
    """
    return generate_with_stats(params, config, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, key=key, eos_id=eos_id, pad_id=pad_id,
                               stop_token_seqs=stop_token_seqs, bucket=bucket)[0]


def truncate_completion(text: str, stop_sequences=HUMANEVAL_STOP) -> str:
    """Cut ``text`` at the earliest occurrence of any stop sequence (HumanEval's list by default)."""
    cuts = [i for i in (text.find(s) for s in stop_sequences if s) if i >= 0]
    return text[:min(cuts)] if cuts else text
