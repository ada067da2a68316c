"""KV-cache sampling with continuous batching, for the Llama-style decoder.

The engine follows JetStream's prefill / insert / generate split (google/JetStream) and keeps Gemma's explicit
cache argument (google-deepmind/gemma, ``gemma/sampler.py``); every forward pass is ``Decoder(config).apply``,
the module that is trained (``decoder.py`` defines the cache layout).

* **Decode slots.** ``S`` slots (``Slots``), each with its own cache rows, position, sample key and stop state.
  A slot holds one sample; once it finishes, the host hands it the next pending sample at once.
* **One prefill per prompt.** A prompt is prefilled once (batch 1, left-padded to a multiple of
  ``PROMPT_BUCKET``) and its cache copied into the slot of each of its samples (``insert``). A slot's prompt
  sits at cache slots [start, P), its generated tokens after it; RoPE positions count from 0 at ``start``.
* **A cache read only where it is filled.** The slots' cache is W positions long, W the shortest window
  (``window_length``: a multiple of 64) that holds every active slot plus one segment. The jitted loop
  (``decode_segment``) runs up to ``SEGMENT`` steps, or until ``refill_at`` slots finished, then the host
  refills slots and grows or shrinks W (``resize``). One compile per (model, S, W), not per prompt width.
* **Nucleus sampling inside the top-k** (``sampling.sample_tokens``): exact wherever the top-k tokens hold the
  nucleus; other rows take the full-vocabulary path.
* **Reproducible samples.** Token t of sample j of prompt i is drawn with
  ``fold_in(fold_in(fold_in(PRNGKey(seed), i), j), t)``: it depends on (seed, i, j) only, never on the slot,
  the neighbours or an interruption.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from fedjax_code.config import EvalConfig
from fedjax_code.malloc import glibc_defaults
from fedjax_code.models.decoder import POSITION_AXIS, Decoder, cache_length, init_cache
from fedjax_code.models.sampling import sample_tokens
from fedjax_code.models.scales import ModelConfig

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
TRACE_COUNTS: collections.Counter = collections.Counter()  # bumped only while tracing (compile counter)
_SENTINEL = -1  # fills the stop-window before the first generated token; never a token id
SLOTS = EvalConfig.slots  # decode slots: the batch of every step
SEGMENT = 16  # decode steps between host visits (refills and window changes)
WINDOW_STEP = 64  # cache windows are multiples of this: one compile per window, each step reads the window only
PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this: one prefill compile per bucket


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


@functools.partial(jax.jit, static_argnames=("config",))
def prefill(params, config: ModelConfig, tokens, lengths):
    """Run left-padded prompts [B,P] through a fresh P-slot cache -> (logits of each row's last token [B,V],
    cache). Row b's real tokens sit at slots [P - lengths[b], P) with RoPE positions 0, 1, ..."""
    TRACE_COUNTS["prefill"] += 1
    b, p = tokens.shape
    cache = init_cache(config, b, p)
    start, slots = p - lengths, jnp.arange(p)
    positions = jnp.maximum(slots[None, :] - start[:, None], 0)
    mask = attention_mask(start, slots[None, :], p)
    logits, cache = Decoder(config).apply({"params": params}, tokens, positions, cache, 0, mask, logits_to_keep=1)
    return logits[:, 0], cache


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


# ----------------------------------------------------------------------------- decode slots

def window_length(n: int) -> int:
    """The shortest cache window that holds n positions: a multiple of WINDOW_STEP, at least 2 of them."""
    return max(2, -(-n // WINDOW_STEP)) * WINDOW_STEP


@struct.dataclass
class Slots:
    """The decode state of S slots: the carry of ``decode_segment`` (W window, N max new tokens, K stop width)."""

    cache: list  # n_layers x {"k", "v"}: W positions of S rows (``decoder.init_cache``), compute dtype
    logits: jax.Array  # [S, V] float32: logits of each slot's next token
    start: jax.Array  # [S] int32: cache slot of the prompt's first token
    pos: jax.Array  # [S] int32: cache slot of the next token fed
    num: jax.Array  # [S] int32: tokens generated (a final EOS counted)
    active: jax.Array  # [S] bool: holds a sample still generating
    key: jax.Array  # [S, 2] uint32: the sample's key (token t draws with fold_in(key, t))
    out: jax.Array  # [S, K-1+N] int32: K-1 sentinels, then the generated ids


def empty_slots(config: ModelConfig, slots: int, window: int, stop_width: int, max_new_tokens: int) -> Slots:
    zeros = lambda *shape: jnp.zeros(shape, jnp.int32)
    return Slots(cache=init_cache(config, slots, window),
                 logits=jnp.zeros((slots, config.vocab_size), jnp.float32), start=zeros(slots), pos=zeros(slots),
                 num=zeros(slots), active=jnp.zeros((slots,), bool), key=jnp.zeros((slots, 2), jnp.uint32),
                 out=zeros(slots, stop_width - 1 + max_new_tokens))


@functools.partial(jax.jit, static_argnames=("window",))
def resize(slots: Slots, window: int) -> Slots:
    """The slots with their cache cut or zero-padded to ``window`` positions (every active slot must fit)."""
    TRACE_COUNTS["resize"] += 1
    def fit(x, axis):
        if window <= x.shape[axis]:
            return lax.slice_in_dim(x, 0, window, axis=axis)
        return jnp.pad(x, [(0, window - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
    return slots.replace(cache=[{n: fit(layer[n], POSITION_AXIS[n]) for n in layer} for layer in slots.cache])


@functools.partial(jax.jit, donate_argnums=0)
def insert(slots: Slots, slot, prompt_cache, logits, length, key) -> Slots:
    """Slot ``slot`` starts a sample of a prefilled prompt: its cache [1,P,...] (the prompt left-padded to P,
    ``length`` real tokens), the logits of its last token [V] and the sample's key."""
    TRACE_COUNTS["insert"] += 1
    p = cache_length(prompt_cache)
    cache = [{name: lax.dynamic_update_slice(layer[name], new[name], (slot, 0, 0, 0)) for name in ("k", "v")}
             for layer, new in zip(slots.cache, prompt_cache)]
    sentinel = jnp.full(slots.out.shape[1:], _SENTINEL, jnp.int32)
    return slots.replace(cache=cache, logits=slots.logits.at[slot].set(logits), start=slots.start.at[slot].set(p - length),
                         pos=slots.pos.at[slot].set(p), num=slots.num.at[slot].set(0),
                         active=slots.active.at[slot].set(True), key=slots.key.at[slot].set(key),
                         out=slots.out.at[slot].set(sentinel))


@functools.partial(jax.jit, static_argnames=("config", "steps", "max_new_tokens"), donate_argnums=1)
def decode_segment(params, slots: Slots, config: ModelConfig, stop_ids, stop_valid, temperature, top_p, eos_id,
                   refill_at, *, steps: int, max_new_tokens: int):
    """Up to ``steps`` decode steps of every active slot -> (slots, steps run); stops early once ``refill_at``
    samples finished or none is left.

    Each step draws every active slot's next token from its logits, appends it to ``out``, ends the sample on
    EOS, a completed stop sequence or max_new_tokens, and feeds the tokens of the samples still going through
    the cache at their own positions. Inactive slots are computed and discarded (fixed shapes).
    """
    TRACE_COUNTS["decode_segment"] += 1
    model, width = Decoder(config), stop_ids.shape[1]
    rows, keys_at = jnp.arange(slots.pos.shape[0]), jnp.arange(cache_length(slots.cache))

    def body(carry):
        s, step, finished = carry
        keys = jax.vmap(jax.random.fold_in)(s.key, s.num)
        tok = jnp.where(s.active, sample_tokens(s.logits, keys, temperature, top_p, s.active), 0)
        out = s.out.at[rows, width - 1 + s.num].set(tok, mode="drop")
        window = jax.vmap(lambda r, n: lax.dynamic_slice(r, (n,), (width,)))(out, s.num)
        num = s.num + s.active
        ended = s.active & ((tok == eos_id) | _stop_hit(window, stop_ids, stop_valid) | (num >= max_new_tokens))
        going = s.active & ~ended
        mask = (keys_at >= s.start[:, None]) & (keys_at <= s.pos[:, None])
        logits, cache = model.apply({"params": params}, tok[:, None], (s.pos - s.start)[:, None], s.cache, s.pos,
                                    mask[:, None])
        s = s.replace(cache=cache, logits=logits[:, 0], pos=s.pos + going, num=num, active=going, out=out)
        return s, step + 1, finished + jnp.sum(ended)

    def cond(carry):
        s, step, finished = carry
        return (step < steps) & (finished < refill_at) & jnp.any(s.active)

    slots, step, _ = lax.while_loop(cond, body, (slots, jnp.int32(0), jnp.int32(0)))
    return slots, step


# ----------------------------------------------------------------------------- host API

def sample_key(seed: int, prompt: int, sample: int) -> jax.Array:
    """The key of sample ``sample`` of prompt ``prompt``: fold_in(fold_in(PRNGKey(seed), prompt), sample)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), prompt), sample)


class _Prompts:
    """Prefills each prompt once, when its first sample is scheduled, and forgets it after its last."""

    def __init__(self, params, config, prompts, pad_id, left: dict):
        self.params, self.config, self.prompts, self.pad_id, self.left = params, config, prompts, pad_id, left
        self.ready, self.seconds = {}, 0.0

    def take(self, i: int):
        """(cache, logits [V], length) of prompt i, for one more of its samples."""
        if i not in self.ready:
            t0 = time.perf_counter()
            tokens, lengths = pad_prompts([self.prompts[i]], self.pad_id, PROMPT_BUCKET)
            logits, cache = jax.block_until_ready(prefill(self.params, self.config, tokens, lengths))
            self.ready[i] = (cache, logits[0], int(lengths[0]))
            self.seconds += time.perf_counter() - t0
        self.left[i] -= 1
        return self.ready[i] if self.left[i] else self.ready.pop(i)


def _fill(held: list, pending: collections.deque) -> list[int]:
    """Give free slots (``held[s]`` None) the next pending samples; returns the slots filled."""
    filled = [s for s in range(len(held)) if held[s] is None][: len(pending)]
    for s in filled:
        held[s] = pending.popleft()
    return filled


def _place(state, config, new, held, pos, seed: int, stop_width: int, max_new_tokens: int) -> Slots:
    """The slots with a cache window that holds every held slot plus a segment (grown, or shrunk by two steps or
    more: fewer resizes, fewer compiles) and the ``new`` samples (slot, prompt cache, logits, length) inserted."""
    window = window_length(max(pos[s] for s in range(len(held)) if held[s] is not None) + SEGMENT)
    if state is None:
        state = empty_slots(config, len(held), window, stop_width, max_new_tokens)
    elif not 0 <= cache_length(state.cache) - window < 2 * WINDOW_STEP:
        state = resize(state, window)
    for s, cache, logits, length in new:
        state = insert(state, s, cache, logits, length, sample_key(seed, *held[s]))
    return state


def sample_stream(params, config: ModelConfig, prompts: Sequence[Sequence[int]], n: int = 1, *, max_new_tokens: int,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                  pad_id: int = 0, stop_token_seqs=(), slots: int = SLOTS, skip=frozenset(),
                  stats: dict | None = None) -> Iterator[tuple[int, int, list[int]]]:
    """Yield (prompt i, sample j, generated ids) for the ``n`` samples of every prompt, in the order they finish.

    The ids end with EOS or a completed stop sequence when one ended the sample. Samples (i, j) in ``skip`` are
    not drawn (a resumed evaluation). ``stats``, if given, is filled with generated_tokens (EOS counted), steps,
    segments, prefill_s, decode_s (inserts, window changes and decode steps, compiles included),
    decode_tokens_per_s (over the segments that compiled nothing, when there are some) and slot_use (the share
    of slot-steps that generated a token).
    RoPE positions may pass ``config.max_len`` (a long prompt plus max_new_tokens); no error is raised for that.
    """
    longest = bucket_length(max(len(p) for p in prompts), PROMPT_BUCKET)
    config = dataclasses.replace(config, max_len=max(config.max_len, longest + max_new_tokens))
    stop_ids, stop_valid = stop_arrays(stop_token_seqs)
    pending = collections.deque((i, j) for i in range(len(prompts)) for j in range(n) if (i, j) not in skip)
    left = collections.Counter(i for i, _ in pending)
    store = _Prompts(params, config, [list(p) for p in prompts], pad_id, left)
    scalars = (jnp.float32(max(temperature, 0.0)), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id))
    held: list = [None] * slots  # the (i, j) each slot holds
    state, pos, num, totals = None, np.zeros(slots, np.int64), np.zeros(slots, np.int64), collections.Counter()
    with glibc_defaults():  # the window's buffers change size: a never-trimmed heap fragments (malloc.py)
        while pending or any(h is not None for h in held):
            new = [(s, *store.take(held[s][0])) for s in _fill(held, pending)]
            for s, cache, *_ in new:
                pos[s], num[s] = cache_length(cache), 0  # the prompt's padded width; nothing generated yet
            t0, compiles = time.perf_counter(), sum(TRACE_COUNTS.values())
            state = _place(state, config, new, held, pos, seed, stop_ids.shape[1], max_new_tokens)
            refill_at = max(1, slots // 16) if pending else slots + 1
            state, steps = decode_segment(params, state, config, stop_ids, stop_valid, *scalars, jnp.int32(refill_at),
                                          steps=SEGMENT, max_new_tokens=max_new_tokens)
            before = num
            active, num, pos = (np.array(x) for x in (state.active, state.num, state.pos))
            seconds, tokens = time.perf_counter() - t0, int(np.sum(num - before))
            totals.update(decode_s=seconds, steps=int(steps), segments=1, generated_tokens=tokens)
            if sum(TRACE_COUNTS.values()) == compiles:
                totals.update(warm_s=seconds, warm_tokens=tokens)
            done = [s for s in range(slots) if held[s] is not None and not active[s]]
            out = np.asarray(state.out) if done else None
            for s in done:
                yield (*held[s], [int(t) for t in out[s, stop_ids.shape[1] - 1:][: num[s]]])
                held[s] = None
    if stats is not None:
        warm = ("warm_tokens", "warm_s") if totals["warm_s"] else ("generated_tokens", "decode_s")
        stats.update(generated_tokens=totals["generated_tokens"], steps=totals["steps"], segments=totals["segments"],
                     prefill_s=store.seconds, decode_s=totals["decode_s"],
                     decode_tokens_per_s=totals[warm[0]] / max(totals[warm[1]], 1e-9),
                     slot_use=totals["generated_tokens"] / max(totals["steps"] * slots, 1))


def generate_with_stats(params, config: ModelConfig, prompts, *, max_new_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, pad_id: int = 0,
                        stop_token_seqs=(), slots: int = SLOTS):
    """``generate`` plus ``sample_stream``'s stats, with num_generated (total) and num_generated_per_row (EOS
    counted)."""
    if max_new_tokens < 1 or max_new_tokens >= config.max_len:
        raise ValueError(f"max_new_tokens must be in [1, {config.max_len}), not {max_new_tokens}")
    if not prompts or min(map(len, prompts)) < 1:
        raise ValueError("every prompt needs at least one token")
    if max(map(len, prompts)) > config.max_len - max_new_tokens:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens exceeds the "
                         f"{config.max_len - max_new_tokens} that max_len leaves beside {max_new_tokens} new tokens")
    stats, rows = {}, [None] * len(prompts)
    for i, _, ids in sample_stream(params, config, prompts, 1, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed, eos_id=eos_id, pad_id=pad_id,
                                   stop_token_seqs=stop_token_seqs, slots=min(slots, len(prompts)), stats=stats):
        rows[i] = ids
    stats.update(num_generated=stats["generated_tokens"], num_generated_per_row=[len(r) for r in rows])
    rows = [r[:-1] if r and r[-1] == eos_id else r for r in rows]
    return rows, stats


def generate(params, config: ModelConfig, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, pad_id: int = 0, stop_token_seqs=(),
             slots: int = SLOTS) -> list[list[int]]:
    """Completions (token ids, final EOS dropped, stop-sequence ids kept) of token-id prompts, one sample each.

    Use ``generate_with_stats`` for token counts and timings (decode tokens/s).
    """
    return generate_with_stats(params, config, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, eos_id=eos_id, pad_id=pad_id,
                               stop_token_seqs=stop_token_seqs, slots=slots)[0]


def truncate_completion(text: str, stop_sequences=HUMANEVAL_STOP) -> str:
    """Cut ``text`` at the earliest occurrence of any stop sequence (HumanEval's list by default)."""
    cuts = [i for i in (text.find(s) for s in stop_sequences if s) if i >= 0]
    return text[:min(cuts)] if cuts else text
