"""Model configuration, the width/depth scaling rule, named presets and analytic size/FLOP counts.

The architecture is Llama-style (Touvron et al. 2023): pre-norm RMSNorm, RoPE (Su et al. 2021),
SwiGLU MLP (Shazeer 2020), optional grouped-query attention (Ainslie et al. 2023), no biases. Three
options, off by default, admit pretrained checkpoints (``models.hf``): q/k/v biases (Qwen2), per-head
q/k RMSNorm (Qwen3) and a head width other than d_model / n_heads (Qwen3, Mistral-Nemo).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fedjax_code.errors import UserError

DTYPES = ("float32", "bfloat16")


class ModelConfigError(UserError, ValueError):
    """An invalid model configuration (a ValueError the CLI also shows as a one-line UserError)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ModelConfigError(message)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the block projections an adapter can sit on


@dataclass(frozen=True)
class ModelConfig:
    """Shape and precision of the decoder; ``dtype`` is the compute dtype, params are always float32.

    ``norm_eps`` is the RMSNorm epsilon (Llama uses 1e-5, Qwen2 1e-6). ``attention_bias`` gives the q, k and v
    projections (not o) biases, as in Qwen2 (Qwen2 technical report, Yang et al. 2024); ``qk_norm`` RMS-normalises
    each head of q and k before RoPE, as in Qwen3, which drops Qwen2's QKV bias for it (Qwen3 technical report,
    Yang et al. 2025, sec. 2); ``head_dim_override`` sets the per-head width when it is not d_model / n_heads
    (q_proj then has n_heads * head_dim outputs). All three are off by default.

    ``lora_rank`` r > 0 gives each projection in ``lora_targets`` (of ``LORA_TARGETS``) a low-rank adapter,
    W x + B A x * lora_alpha / r (LoRA, Hu et al. 2022; ``models.lora``); 0, the default, gives none.
    """

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 344
    max_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dtype: str = "float32"
    norm_eps: float = 1e-5
    attention_bias: bool = False
    qk_norm: bool = False
    head_dim_override: int | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # hashable when read back from JSON
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, not {value!r}")
        if self.head_dim_override is None:
            _require(self.d_model % self.n_heads == 0,
                     f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        else:
            _require(isinstance(self.head_dim_override, int) and self.head_dim_override > 0,
                     f"head_dim_override must be a positive integer or None, not {self.head_dim_override!r}")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        _require(self.head_dim % 2 == 0, f"head_dim (d_model / n_heads unless head_dim_override is set) must be even "
                                         f"for RoPE, not {self.head_dim}")
        _require(self.rope_theta > 0, f"rope_theta must be positive, not {self.rope_theta}")
        _require(self.norm_eps > 0, f"norm_eps must be positive, not {self.norm_eps}")
        _require(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        _require(isinstance(self.lora_rank, int) and self.lora_rank >= 0,
                 f"lora_rank must be a non-negative integer (0: no adapters), not {self.lora_rank!r}")
        if self.lora_rank:
            _require(self.lora_alpha > 0, f"lora_alpha must be positive, not {self.lora_alpha}")
            unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
            _require(not unknown and len(self.lora_targets) > 0,
                     f"lora_targets must name some of {', '.join(LORA_TARGETS)}, not {list(self.lora_targets)}")
            for t in self.lora_targets:
                width = min(self.linear_shape(t))
                _require(self.lora_rank <= width,
                         f"lora_rank {self.lora_rank} exceeds the width {width} of the {t} projection")

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(in, out) of a block's projection named by a LoRA target (``LORA_TARGETS``)."""
        q, kv, d, ff = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.d_model, self.d_ff
        return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, ff), "up": (d, ff),
                "down": (ff, d)}[target]

    @property
    def head_dim(self) -> int:
        """Per-head width: ``head_dim_override`` if set, else d_model // n_heads."""
        return self.d_model // self.n_heads if self.head_dim_override is None else self.head_dim_override


def _round_to(x: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple``."""
    return max(multiple, int(round(x / multiple)) * multiple)


def _kv_heads(n_heads: int, ratio: int) -> int:
    """Largest divisor of n_heads not above n_heads / ratio (at least 1): keeps the GQA group size."""
    target = max(1, n_heads // ratio)
    return max(d for d in range(1, target + 1) if n_heads % d == 0)


def scale(base: ModelConfig, factor: float) -> ModelConfig:
    """Scale ``base`` by ``factor`` in width (and, more slowly, depth).

    Rule (head_dim fixed, as in the Llama/Chinchilla families):
      * d_model = nearest multiple of base.head_dim to base.d_model * factor (at least one head);
        n_heads = d_model / head_dim;
      * n_kv_heads keeps the base query-per-kv group size (largest divisor of n_heads <= n_heads/group);
      * d_ff keeps the base d_ff/d_model ratio (8/3 for SwiGLU presets), rounded to a multiple of 8;
      * n_layers = round(base.n_layers * sqrt(factor)), at least 1.
    Every size is non-decreasing in ``factor``, so params grow monotonically; ``scale(base, 1.0) == base``.
    Non-embedding params therefore grow roughly as factor**2.5 (width**2 x depth).
    vocab_size, max_len, rope_theta, tie_embeddings, dtype, norm_eps and the attention options are copied
    from ``base``.
    """
    _require(factor > 0 and math.isfinite(factor), f"scale factor must be a positive number, not {factor!r}")
    _require(base.n_heads * base.head_dim == base.d_model,
             f"only a config with n_heads * head_dim == d_model can be scaled, not {base.n_heads} x {base.head_dim}")
    hd = base.head_dim
    d_model = _round_to(base.d_model * factor, hd)
    n_heads = d_model // hd
    d_ff = base.d_ff if d_model == base.d_model else _round_to(base.d_ff * d_model / base.d_model, 8)
    return dataclasses.replace(
        base, d_model=d_model, n_heads=n_heads, n_kv_heads=_kv_heads(n_heads, base.n_heads // base.n_kv_heads),
        d_ff=d_ff, n_layers=max(1, int(round(base.n_layers * math.sqrt(factor)))))


# CPU base: ~1.8M params, a few thousand tokens/s on 2 cores. Tied embeddings because at this width
# a separate 8192 x d lm head would dominate the parameter count (as in Qwen2-0.5B).
CPU_BASE = ModelConfig(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=344,
                       max_len=256, tie_embeddings=True, dtype="float32")
# GPU base: GPT-2-small width/depth (768 x 12) with GQA (3 query heads per kv head), bf16 compute.
GPU_BASE = ModelConfig(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048,
                       max_len=1024, tie_embeddings=False, dtype="bfloat16")
LADDER_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _ladder(prefix: str, base: ModelConfig) -> dict[str, ModelConfig]:
    return {f"{prefix}-{f:g}": scale(base, f) for f in LADDER_FACTORS}


PRESETS: dict[str, ModelConfig] = {**_ladder("cpu", CPU_BASE), **_ladder("gpu", GPU_BASE)}


def get_preset(name: str) -> ModelConfig:
    """The named preset config; ValueError listing the valid names for an unknown one."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; valid presets are {', '.join(PRESETS)}")
    return PRESETS[name]


def param_count(config: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of ``Decoder(config)``.

    ``params_non_embedding`` excludes the vocabulary matrices (embed_tokens and, if untied, lm_head),
    following Kaplan et al. 2020; it includes the RMSNorm scales. ``params_total`` counts the model without
    LoRA adapters; ``params_lora`` counts the adapters (r x (in + out) per adapted projection), and
    ``params_trainable`` is what training updates and sends: the adapters when there are any, else the model.
    """
    c = config
    q_width, kv_width = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attn = 2 * c.d_model * q_width + 2 * c.d_model * kv_width  # q, o + k, v
    attn += (q_width + 2 * kv_width) * c.attention_bias + 2 * c.head_dim * c.qk_norm  # q/k/v biases, q/k norms
    layer = attn + 3 * c.d_model * c.d_ff + 2 * c.d_model  # + SwiGLU + two norms
    non_embedding = c.n_layers * layer + c.d_model  # + final norm
    vocab = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    lora = c.n_layers * c.lora_rank * sum(sum(c.linear_shape(t)) for t in c.lora_targets) if c.lora_rank else 0
    total = non_embedding + vocab
    return {"params_total": total, "params_non_embedding": non_embedding, "params_lora": lora,
            "params_trainable": lora or total}


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward) of the matmuls, as MFU counts them.

    C = 6 * (N_non_embedding + d_model * vocab_size) + 12 * n_layers * seq_len * d_model
    (Chowdhery et al. 2022, PaLM, appendix B: 6N plus 12 L H Q T). The lm-head (logits) matmul
    d_model * vocab_size is counted (as Chinchilla, Hoffmann et al. 2022, does), because for small models
    it is a large share of compute whether or not it is tied; the embedding lookup costs nothing. The
    attention term counts both attention matmuls (q k^T and p v, 2 FLOPs per multiply-add, times 3 for
    forward + backward; Kaplan et al. 2020 count only the first) over the full context (no causal
    halving); seq_len defaults to max_len.
    """
    seq_len = config.max_len if seq_len is None else seq_len
    n = param_count(config)["params_non_embedding"] + config.d_model * config.vocab_size
    return 6 * n + 12 * config.n_layers * seq_len * config.d_model


def model_info(config: ModelConfig) -> dict:
    """Summary of a config: shape, param counts, training FLOPs/token and weight size in MB (1e6 bytes)."""
    counts = param_count(config)
    total = counts["params_total"]
    return {
        "d_model": config.d_model, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads, "d_ff": config.d_ff, "vocab_size": config.vocab_size,
        "max_len": config.max_len, **counts, "flops_per_token": flops_per_token(config),
        "size_mb": {"fp32": total * 4 / 1e6, "bf16": total * 2 / 1e6},
    }


def format_ladder(names=None) -> str:
    """A plain-text table (name, d_model, n_layers, n_heads, n_kv_heads, d_ff, params_total) of presets."""
    names = list(PRESETS) if names is None else list(names)
    rows = [f"{'name':<9} {'d_model':>7} {'n_layers':>8} {'n_heads':>7} {'n_kv':>4} {'d_ff':>5} {'params_total':>13}"]
    for name in names:
        c = get_preset(name)
        rows.append(f"{name:<9} {c.d_model:>7} {c.n_layers:>8} {c.n_heads:>7} {c.n_kv_heads:>4} {c.d_ff:>5} "
                    f"{param_count(c)['params_total']:>13,}")
    return "\n".join(rows)
