"""Function-preserving growth of a decoder to a larger config (Net2Net: Chen et al. 2016, "Net2Net: Accelerating
Learning via Knowledge Transfer"), so a model moved one step up the scaling ladder computes the same logits.

Width: the residual stream is copied m = d'/d times, x' = [x, ..., x], which keeps every RMSNorm's statistics
(so this needs d' = m d exactly). Weights reading the stream take 1/m of each copy; weights writing it write
every copy. Attention heads are copied with the stream (head j' = head j' mod H, head_dim unchanged), and
MLP units j' copy unit j' mod d_ff with the down projection split among the copies (Net2WiderNet). With tied
embeddings the final norm is scaled by 1/m, since the logits sum over all copies.
Depth (Net2DeeperNet): new blocks are appended, each a copy of the last block with its attention and MLP output
projections zeroed, an identity under the pre-norm residual that still receives gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .scales import ModelConfig, ModelConfigError


def _check(src: ModelConfig, dst: ModelConfig) -> int:
    m = dst.d_model // src.d_model
    problems = [
        (dst.d_model != m * src.d_model, f"d_model {dst.d_model} is not a multiple of {src.d_model}"),
        (dst.n_heads != m * src.n_heads or dst.n_kv_heads != m * src.n_kv_heads,
         f"heads {dst.n_heads}/{dst.n_kv_heads} are not {m} x {src.n_heads}/{src.n_kv_heads}"),
        (dst.head_dim != src.head_dim, f"head_dim changes ({src.head_dim} -> {dst.head_dim})"),
        (dst.d_ff < src.d_ff or dst.n_layers < src.n_layers, "d_ff or n_layers shrinks"),
        ((dst.vocab_size, dst.tie_embeddings) != (src.vocab_size, src.tie_embeddings),
         "the vocabulary or tying differs"),
        (src.attention_bias or src.qk_norm or src.lora_rank or dst.lora_rank, "biases, qk-norm and LoRA are not grown"),
    ]
    for bad, why in problems:
        if bad:
            raise ModelConfigError(f"cannot grow {src} into {dst} preserving its function: {why}")
    return m


def grow(params: dict, src: ModelConfig, dst: ModelConfig) -> dict:
    """``params`` of a ``src`` decoder as the params of a ``dst`` decoder with the same logits (up to rounding)."""
    m = _check(src, dst)
    units = np.arange(dst.d_ff) % src.d_ff
    share = 1.0 / np.bincount(units, minlength=src.d_ff)[units]

    def reads(w):  # [d, n] -> [m d, n]
        return jnp.tile(w, (m, 1)) / m

    def writes(w):  # [n, d] -> [n, m d]
        return jnp.tile(w, (1, m))

    def block(b):
        a, f = b["self_attn"], b["mlp"]
        return {
            "input_layernorm": {"weight": jnp.tile(b["input_layernorm"]["weight"], m)},
            "post_attention_layernorm": {"weight": jnp.tile(b["post_attention_layernorm"]["weight"], m)},
            "self_attn": {
                **{k: {"kernel": jnp.tile(reads(a[k]["kernel"]), (1, m))} for k in ("q_proj", "k_proj", "v_proj")},
                "o_proj": {"kernel": writes(jnp.tile(a["o_proj"]["kernel"], (m, 1)) / m)},
            },
            "mlp": {
                "gate_proj": {"kernel": reads(f["gate_proj"]["kernel"])[:, units]},
                "up_proj": {"kernel": reads(f["up_proj"]["kernel"])[:, units]},
                "down_proj": {"kernel": writes(f["down_proj"]["kernel"][units] * share[:, None].astype(np.float32))},
            },
        }

    out = {"embed_tokens": {"embedding": writes(params["embed_tokens"]["embedding"])},
           "norm": {"weight": jnp.tile(params["norm"]["weight"], m) / (m if src.tie_embeddings else 1)}}
    if "lm_head" in params:
        out["lm_head"] = {"kernel": reads(params["lm_head"]["kernel"])}
    for i in range(src.n_layers):
        out[f"layers_{i}"] = block(params[f"layers_{i}"])
    last = out[f"layers_{src.n_layers - 1}"]
    zero = lambda w: {"kernel": jnp.zeros_like(w["kernel"])}  # noqa: E731
    for i in range(src.n_layers, dst.n_layers):
        out[f"layers_{i}"] = {**last, "self_attn": {**last["self_attn"], "o_proj": zero(last["self_attn"]["o_proj"])},
                              "mlp": {**last["mlp"], "down_proj": zero(last["mlp"]["down_proj"])}}
    dtype = jax.tree.leaves(params)[0].dtype
    return jax.tree.map(lambda x: jnp.array(x, dtype, copy=True), out)  # new blocks share no buffer with the last
