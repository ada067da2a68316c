"""A Llama-style decoder-only LM in flax.linen (Touvron et al. 2023).

Pre-norm RMSNorm blocks with causal self-attention using rotary position embeddings (Su et al. 2021),
optional grouped-query attention (Ainslie et al. 2023) and a SwiGLU MLP (Shazeer 2020); no biases. For
pretrained checkpoints (``hf.py``) the config can add q/k/v biases (Qwen2) and per-head q/k RMSNorm (Qwen3).
Parameter names follow HF Llama/Qwen2/Qwen3 (``embed_tokens``, ``layers_{i}/self_attn/q_proj``, ...) so
checkpoints map onto it; Dense kernels are stored [in, out], i.e. transposed relative to torch.

``init``/``apply`` are pure: params are a plain dict of float32 arrays that can be stacked on a leading
client axis and vmapped. The one ``Decoder`` serves training, evaluation and sampling: called with an
explicit KV cache (``init_cache``: per-layer ``{"k", "v"}`` over L positions, ``CACHE_AXES``) it writes this
chunk's keys/values at ``cache_index``, attends over the whole cache under a given mask and returns the
new cache with the logits, as in Gemma's sampler (google-deepmind/gemma); no mutable flax collections,
so it jits and vmaps like the cache-free call.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_code.models.scales import ModelConfig

PARAM_DTYPE = jnp.float32
INIT_STD = 0.02


def compute_dtype(config: ModelConfig):
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B,T,H,D] at integer positions [B,T] (Su et al. 2021).

    Uses the HF "rotate_half" layout (pairs dimension i with i + D/2), so HF Llama/Qwen2 q/k weights
    apply unchanged. Computed in float32 and cast back to x.dtype.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
    """Boolean [1,T,S] mask; query i (the last q_len of kv_len positions) sees keys j <= its index."""
    kv_len = q_len if kv_len is None else kv_len
    q_idx = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    return (jnp.arange(kv_len)[None, :] <= q_idx)[None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention: q [B,T,H,D], k/v [B,S,KV,D], mask broadcastable to [B,T,S].

    Grouped-query attention (GQA): query heads are grouped [B,T,KV,H/KV,D] against their shared KV head, so
    k and v are never repeated (a repeat copies the whole KV cache every decode step). Scores and softmax in
    float32; output in v.dtype.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h, d)


# The KV cache's layout: k as [B, KV, D, L] and v as [B, KV, L, D] (L cache positions). A decode step's scores
# then reduce over D with the positions innermost, and its output over L with D innermost: XLA:CPU fuses each
# into one pass over the cache at 11 GB/s, against 8 GB/s in the [B, L, KV, D] layout and 4 GB/s as a batched
# mat-vec einsum (SmolLM2-135M's cache, 64 rows x 512 positions x 30 layers, measured while building the sampler).
CACHE_AXES = {"k": (0, 2, 3, 1), "v": (0, 2, 1, 3)}  # [B,T,KV,D] -> the cache's layout
POSITION_AXIS = {"k": 3, "v": 2}


def cache_length(cache: list[dict]) -> int:
    """The number of positions of a cache (``init_cache``'s per-layer list)."""
    return cache[0]["k"].shape[POSITION_AXIS["k"]]


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """``attend`` over a cache: q [B,T,H,D], k [B,KV,D,L], v [B,KV,L,D], mask [B or 1,T,L] -> [B,T,H,D].

    One query per row (T = 1, a decode step) is a multiply-and-reduce that XLA fuses into a pass over the cache;
    a longer chunk (a prefill) is two einsums."""
    b, t, h, d = q.shape
    n_kv, f32 = k.shape[1], jnp.float32
    if t == 1:
        return _attend_one(q.reshape(b, n_kv, h // n_kv, d), k, v, mask[:, 0]).reshape(b, 1, h, d)
    q = q.reshape(b, t, n_kv, h // n_kv, d).transpose(0, 2, 1, 3, 4)  # [B,KV,T,R,D]
    scores = jnp.einsum("bgtrd,bgdl->bgtrl", q, k, preferred_element_type=f32)
    scores = jnp.where(mask[:, None, :, None], scores / math.sqrt(d), jnp.finfo(f32).min)  # [B,KV,T,R,L]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgtrl,bgld->bgtrd", probs, v, preferred_element_type=f32)
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d).astype(v.dtype)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """One query per row: q [B,KV,R,D] over k [B,KV,D,L] and v [B,KV,L,D] under mask [B or 1,L] -> [B,KV,R,D].

    Without grouped queries (R = 1) the R axis is left out: XLA:CPU fuses these reductions about 40x slower with
    a size-1 broadcast axis in them (measured on the cpu-1 ladder's caches)."""
    f32, r = jnp.float32, q.shape[2]
    q = q[:, :, 0, :, None] if r == 1 else q[..., None]  # [B,KV,D,1] or [B,KV,R,D,1]
    k, v = k.astype(f32), v.astype(f32)
    scores = jnp.sum(q.astype(f32) * (k if r == 1 else k[:, :, None]), axis=-2) / math.sqrt(k.shape[2])
    mask = mask[:, None] if r == 1 else mask[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(f32).min), axis=-1)  # [B,KV,L] or [B,KV,R,L]
    out = jnp.sum(probs[..., None] * (v if r == 1 else v[:, :, None]), axis=-2)
    return (out[:, :, None] if r == 1 else out).astype(v.dtype)


@jax.custom_vjp
def tied_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """Logits x [..., d] @ embedding [V, d]^T of a tied LM head.

    The same product as ``nn.Embed.attend``, with a backward pass that computes the embedding's
    gradient as [d, V] and transposes it once: XLA:CPU's [N, V]^T @ [N, d] dot runs at about 40% of
    the speed of the [N, d]^T @ [N, V] one (measured at d=128, V=8192), and left alone XLA folds the
    transpose back into the slow dot, hence the optimization barrier.
    """
    return x @ embedding.T


def _tied_logits_fwd(x, embedding):
    return x @ embedding.T, (x, embedding)


def _tied_logits_bwd(residuals, g):
    x, embedding = residuals
    d_embedding_t = jax.lax.optimization_barrier(
        jnp.einsum("...d,...v->dv", x, g, preferred_element_type=embedding.dtype))
    return (g @ embedding).astype(x.dtype), d_embedding_t.T


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class Linear(nn.Module):
    """x @ kernel [in, out] (+ bias), float32 params computed in ``dtype``: ``nn.Dense``'s product and names.

    With ``lora_rank`` r > 0 it adds the low-rank update (x @ lora_a [in, r]) @ lora_b [r, out] * lora_alpha / r
    (LoRA, Hu et al. 2022), never forming the merged weight, so stacked per-client adapters share one base.
    lora_a starts ~U(-1/sqrt(in), 1/sqrt(in)) and lora_b at zero (as PEFT), so a new adapter changes nothing.
    """

    features: int
    dtype: jnp.dtype = jnp.float32
    std: float = INIT_STD
    bias: bool = False
    lora_rank: int = 0
    lora_alpha: float = 1.0

    @nn.compact
    def __call__(self, x):
        d_in, dt = x.shape[-1], self.dtype
        kernel = self.param("kernel", nn.initializers.normal(self.std), (d_in, self.features), PARAM_DTYPE)
        x = x.astype(dt)
        y = x @ kernel.astype(dt)
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), PARAM_DTYPE).astype(dt)
        if self.lora_rank:
            bound = 1.0 / math.sqrt(d_in)
            a = self.param("lora_a", lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound),
                           (d_in, self.lora_rank), PARAM_DTYPE)
            b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, self.features), PARAM_DTYPE)
            y = y + ((x @ a.astype(dt)) @ b.astype(dt)) * (self.lora_alpha / self.lora_rank)
        return y


def _dense(features: int, dtype, name: str | None = None, std: float = INIT_STD, bias: bool = False,
           lora: tuple[int, float] = (0, 1.0)) -> Linear:
    """A ``Linear`` (bias-free unless ``bias``; zero-initialised bias; ``lora`` = (rank, alpha)); ``name`` is
    left out inside ``setup`` (attribute names)."""
    kw = {} if name is None else {"name": name}
    return Linear(features, dtype, std, bias, *lora, **kw)


def _lora(config: ModelConfig, target: str) -> tuple[int, float]:
    """(rank, alpha) of the adapter on a block projection (a ``LORA_TARGETS`` name): rank 0 when it has none."""
    return (config.lora_rank if target in config.lora_targets else 0), config.lora_alpha


def _out_std(config: ModelConfig) -> float:
    """Residual-output projections are scaled by 1/sqrt(2 n_layers) (GPT-2 style)."""
    return INIT_STD / math.sqrt(2 * config.n_layers)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (param ``weight``); normalises in float32, returns ``dtype``."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), PARAM_DTYPE)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * w).astype(self.dtype)


class Attention(nn.Module):
    """Causal multi-head / grouped-query self-attention with RoPE.

    Options (``ModelConfig``): q/k/v biases (``attention_bias``, Qwen2) and RMSNorm of each q and k head over
    head_dim before RoPE (``qk_norm``, Qwen3; params ``q_norm``/``k_norm`` of shape [head_dim]).
    """

    config: ModelConfig

    def setup(self):
        c, dt = self.config, compute_dtype(self.config)
        self.q_proj = _dense(c.n_heads * c.head_dim, dt, bias=c.attention_bias, lora=_lora(c, "q"))
        self.k_proj = _dense(c.n_kv_heads * c.head_dim, dt, bias=c.attention_bias, lora=_lora(c, "k"))
        self.v_proj = _dense(c.n_kv_heads * c.head_dim, dt, bias=c.attention_bias, lora=_lora(c, "v"))
        self.o_proj = _dense(c.d_model, dt, std=_out_std(c), lora=_lora(c, "o"))
        if c.qk_norm:
            self.q_norm = RMSNorm(c.norm_eps, dt)
            self.k_norm = RMSNorm(c.norm_eps, dt)

    def qkv(self, x, positions):
        """Project x [B,T,d] to q [B,T,H,D] and k, v [B,T,KV,D], with RoPE applied to q and k."""
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.n_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

    def out(self, y):
        """Merge heads of y [B,T,H,D] and project back to [B,T,d]."""
        return self.o_proj(y.reshape(*y.shape[:2], -1))

    def __call__(self, x, positions, mask, kv=None, cache_index=None):
        """Attention of x [B,T,d] -> (y [B,T,d], kv).

        Without ``kv`` the keys are x's own (mask [.,T,T]) and kv stays None. With this layer's cache
        ``kv`` ({"k","v"} over L positions, ``CACHE_AXES``) the chunk's k/v are written at slots [cache_index, cache_index+T)
        (``write_cache``: one index, or one per row) and q attends over all L slots (mask [B,T,L]); the
        updated cache is returned.
        """
        q, k, v = self.qkv(x, positions)
        if kv is None:
            return self.out(attend(q, k, v, mask)), kv
        kv = {"k": write_cache(kv["k"], k, cache_index, "k"), "v": write_cache(kv["v"], v, cache_index, "v")}
        return self.out(attend_cached(q, kv["k"], kv["v"], mask)), kv


def write_cache(buf: jax.Array, new: jax.Array, index, name: str) -> jax.Array:
    """Cache ``name`` ("k" or "v", in its ``CACHE_AXES`` layout) with new [B,T,KV,D] written at positions
    [index, index+T): a scalar index for every row, or an [B] index per row (a scatter; each decode slot of the
    sampler sits at its own position)."""
    new, axis = new.astype(buf.dtype).transpose(CACHE_AXES[name]), POSITION_AXIS[name]
    if jnp.ndim(index) == 0:
        return lax.dynamic_update_slice_in_dim(buf, new, index, axis)
    return jax.vmap(lambda row, x, i: lax.dynamic_update_slice_in_dim(row, x, i, axis - 1))(buf, new, index)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, dt = self.config, compute_dtype(self.config)
        h = nn.silu(_dense(c.d_ff, dt, "gate_proj", lora=_lora(c, "gate"))(x)) * \
            _dense(c.d_ff, dt, "up_proj", lora=_lora(c, "up"))(x)
        return _dense(c.d_model, dt, "down_proj", std=_out_std(c), lora=_lora(c, "down"))(h)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); returns (x, kv) as ``Attention``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, cache_index=None):
        c, dt = self.config, compute_dtype(self.config)
        h = RMSNorm(c.norm_eps, dt, name="input_layernorm")(x)
        h, kv = Attention(c, name="self_attn")(h, positions, mask, kv, cache_index)
        x = x + h
        return x + MLP(c, name="mlp")(RMSNorm(c.norm_eps, dt, name="post_attention_layernorm")(x)), kv


class Decoder(nn.Module):
    """The LM. ``apply({'params': p}, tokens [B,T] int32, positions=None)`` -> logits [B,T,V] float32.

    With ``cache`` (``init_cache``'s per-layer list) it returns ``(logits, new_cache)``: the chunk's k/v
    go to cache slots [cache_index, cache_index+T) (default 0; a [B] array gives each row its own slot, as the
    sampler's decode slots need) and queries attend over the whole cache
    under ``attn_mask`` [B,T,L] (default: causal by slot, key slot <= query slot). ``positions`` ([T] or
    [B,T], default cache_index + 0..T-1) only set the RoPE phases; without a cache ``attn_mask`` is [B,T,T]
    (default: causal by index), e.g. causal and padding for a left-padded batch.
    ``logits_to_keep`` = n > 0 (a Python int, as in HF transformers) computes the logits of the last n
    positions only, [B,n,V]: a prefill needs just the last one.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None, cache_index=None, attn_mask=None,
                 logits_to_keep: int = 0):
        c, dt = self.config, compute_dtype(self.config)
        b, t = tokens.shape
        if t > c.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {c.max_len}")
        start = 0 if cache_index is None else cache_index
        positions = _slots(start, t) if positions is None else jnp.asarray(positions)
        positions = jnp.broadcast_to(positions, (b, t))
        mask, layer_kv = _mask_and_kv(c, t, cache, start, attn_mask)
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=dt, param_dtype=PARAM_DTYPE,
                         embedding_init=nn.initializers.normal(INIT_STD), name="embed_tokens")
        x, new_cache = embed(tokens), []
        for i, kv in enumerate(layer_kv):
            x, kv = DecoderLayer(c, name=f"layers_{i}")(x, positions, mask, kv, start)
            new_cache.append(kv)
        x = RMSNorm(c.norm_eps, dt, name="norm")(x[:, -logits_to_keep:] if logits_to_keep else x)
        if c.tie_embeddings:
            logits = tied_logits(x, embed.embedding.astype(dt))
        else:
            logits = _dense(c.vocab_size, dt, "lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def _mask_and_kv(config: ModelConfig, t: int, cache, cache_index, attn_mask):
    """(attention mask, per-layer kv) for a chunk of t tokens: without a cache ``attn_mask`` or by default the
    causal [1,T,T] mask, and no kv; with one, ``attn_mask`` or by default the causal-by-slot [1,T,L] mask
    (slot cache_index + i sees slots <= cache_index + i), and the cache, checked to hold n_layers entries of
    at least t slots."""
    if cache is None:
        return (causal_mask(t) if attn_mask is None else attn_mask), [None] * config.n_layers
    length = cache_length(cache)
    if len(cache) != config.n_layers or t > length:
        raise ValueError(f"cache of {len(cache)} layers x {length} slots does not fit {config.n_layers} layers "
                         f"x {t} tokens")
    if attn_mask is None:
        attn_mask = jnp.arange(length) <= _slots(cache_index, t)[..., None]
        attn_mask = attn_mask.reshape(-1, t, length)
    return attn_mask, cache


def _slots(index, t: int) -> jax.Array:
    """Cache slots index + 0..t-1: [t] for a scalar index, [B,t] for one index per row."""
    return jnp.asarray(index)[..., None] + jnp.arange(t)


def init_cache(config: ModelConfig, batch: int, length: int | None = None) -> list[dict]:
    """Zeroed per-layer ``{"k", "v"}`` for ``length`` positions (default max_len) in the compute dtype, k as
    [batch, n_kv_heads, head_dim, length] and v as [batch, n_kv_heads, length, head_dim] (``CACHE_AXES``): the
    ``cache`` argument of ``Decoder``."""
    shape = (batch, length or config.max_len, config.n_kv_heads, config.head_dim)
    return [{name: jnp.zeros(tuple(shape[a] for a in axes), compute_dtype(config)) for name, axes in CACHE_AXES.items()}
            for _ in range(config.n_layers)]


def init_params(config: ModelConfig, key: jax.Array) -> dict:
    """Fresh float32 params for ``Decoder(config)`` (a plain nested dict)."""
    tokens = jnp.zeros((1, min(8, config.max_len)), jnp.int32)
    return Decoder(config).init(key, tokens)["params"]


def num_params(params) -> int:
    """Total number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def loss_fn(params, config: ModelConfig, batch: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy of batch [B,T+1] int32; mask [B,T] weights the T targets."""
    logits = Decoder(config).apply({"params": params}, batch[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
    if mask is None:
        return ce.mean()
    mask = mask.astype(jnp.float32)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
