"""Llama-style decoder LM (flax.linen), its configuration, scaling rule, presets and size/FLOP counts, and
Hugging Face and GGUF checkpoint import/export (``hf``, ``gguf``, ``pretrained``)."""

from fedjax_code.models.decoder import (
    Attention,
    Decoder,
    DecoderLayer,
    MLP,
    RMSNorm,
    attend,
    causal_mask,
    compute_dtype,
    init_cache,
    init_params,
    loss_fn,
    num_params,
    rope,
)
from fedjax_code.models.hf import config_from_hf, load_hf_dir, logits, save_hf_dir, to_hf_config
from fedjax_code.models.pretrained import REGISTRY, Pretrained, load_pretrained
from fedjax_code.models.scales import (
    CPU_BASE,
    GPU_BASE,
    LADDER_FACTORS,
    PRESETS,
    ModelConfig,
    ModelConfigError,
    flops_per_token,
    format_ladder,
    get_preset,
    model_info,
    param_count,
    scale,
)

__all__ = [
    "Attention", "Decoder", "DecoderLayer", "MLP", "RMSNorm", "attend", "causal_mask", "compute_dtype",
    "init_cache", "init_params", "loss_fn", "num_params", "rope",
    "CPU_BASE", "GPU_BASE", "LADDER_FACTORS", "PRESETS", "ModelConfig", "ModelConfigError",
    "flops_per_token", "format_ladder", "get_preset", "model_info", "param_count", "scale",
    "config_from_hf", "load_hf_dir", "logits", "save_hf_dir", "to_hf_config", "REGISTRY", "Pretrained",
    "load_pretrained",
]
