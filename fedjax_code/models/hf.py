"""Hugging Face checkpoints in and out of the one ``Decoder``: config mapping, safetensors import/export, logits.

Supported ``model_type``s: llama, mistral, qwen2 (q/k/v biases, Qwen2 technical report, Yang et al. 2024) and
qwen3 (per-head q/k RMSNorm and an explicit head_dim, Qwen3 technical report, Yang et al. 2025). All four are
the same pre-norm RoPE/SwiGLU/GQA decoder, whose parameter names ours follow: HF ``model.layers.0.self_attn.
q_proj.weight`` [out, in] is our ``layers_0/self_attn/q_proj/kernel`` [in, out]. Anything that would change the
function computed (scaled RoPE, o_proj or MLP biases, other activations, quantised weights) is refused with a
``UserError``. A sliding attention window (Mistral v0.1; Qwen2/3 with ``use_sliding_window``) is honoured by
capping ``max_len`` at the window, below which it masks nothing. Params are float32 whatever the file's dtype.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy API reads bf16 tensors)
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedjax_code.errors import UserError
from fedjax_code.models.decoder import Decoder, causal_mask, init_params
from fedjax_code.models.scales import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


# ----------------------------------------------------------------------------- config

def _get(hf: dict, key: str):
    if hf.get(key) is None:
        raise UserError(f"the Hugging Face config lacks {key!r}")
    return hf[key]


def _check_supported(hf: dict, model_type: str) -> None:
    """Refuse the config options our decoder does not compute, one sentence each."""
    if model_type not in ARCHITECTURES:
        raise UserError(f"model_type {model_type!r} is not supported; use one of {', '.join(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported; the SwiGLU MLP needs 'silu'")
    if hf.get("mlp_bias"):
        raise UserError("mlp_bias is not supported; the MLP projections have no biases")
    if hf.get("attention_bias") and model_type != "qwen2":
        raise UserError(f"attention_bias is not supported for {model_type}, whose o_proj would have a bias too")
    if hf.get("quantization_config"):
        raise UserError("quantised checkpoints are not supported; use one with float weights")


def _rope_theta(hf: dict) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or ``rope_theta``; refuses scaled RoPE."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"rope scaling {kind!r} is not supported; only plain RoPE (rope_scaling null) is")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported; RoPE must span "
                        "the whole head")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _max_len(hf: dict, model_type: str) -> int:
    """max_position_embeddings, capped at an active sliding window (with T <= window it masks nothing)."""
    n = _get(hf, "max_position_embeddings")
    active = model_type == "mistral" or hf.get("use_sliding_window")
    window = hf.get("sliding_window") if active else None
    return min(n, window) if window else n


def config_from_hf(hf_config: dict) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``config.json`` dict (llama, mistral, qwen2 or qwen3), float32."""
    if not isinstance(hf_config, dict):
        raise UserError(f"a Hugging Face config must be a JSON object, not {type(hf_config).__name__}")
    hf, model_type = hf_config, hf_config.get("model_type")
    _check_supported(hf, model_type)
    d_model, n_heads = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_heads == d_model:
        head_dim = None  # the default width: keep the config canonical
    return ModelConfig(
        vocab_size=_get(hf, "vocab_size"), d_model=d_model, n_layers=_get(hf, "num_hidden_layers"),
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=_get(hf, "intermediate_size"),
        max_len=_max_len(hf, model_type), rope_theta=_rope_theta(hf),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype="float32",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3", head_dim_override=head_dim)


def to_hf_config(config: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict of ``config``: qwen3 with q/k norms, qwen2 with q/k/v biases,
    else llama."""
    if config.qk_norm and config.attention_bias:
        raise UserError("no supported Hugging Face architecture has both q/k norms and q/k/v-only biases")
    model_type = "qwen3" if config.qk_norm else "qwen2" if config.attention_bias else "llama"
    hf = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_len, "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,  # transformers 4 reads rope_theta, 5 this:
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "dtype": "float32",
    }
    if model_type != "qwen2":  # llama's and qwen3's flag would also give o_proj a bias
        hf["attention_bias"] = False
    if model_type != "llama":
        hf |= {"use_sliding_window": False, "sliding_window": None}
    return hf


# ----------------------------------------------------------------------------- tensor names

def hf_module_name(path: tuple[str, ...]) -> str:
    """HF module name of one of our module paths, e.g. (layers_0, mlp, up_proj) -> model.layers.0.mlp.up_proj."""
    if path == ("lm_head",):
        return "lm_head"
    return ".".join(["model", *(p.replace("layers_", "layers.", 1) if p.startswith("layers_") else p for p in path)])


def _hf_name(path: tuple[str, ...]) -> str:
    """HF tensor name of one of our param paths, e.g. (layers_0, mlp, up_proj, kernel) ->
    model.layers.0.mlp.up_proj.weight."""
    leaf = path[-1]
    return f"{hf_module_name(path[:-1])}.{'weight' if leaf in ('kernel', 'embedding') else leaf}"


@functools.lru_cache(maxsize=8)
def _expected(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """HF tensor name -> (our param path, our shape) for every param of ``Decoder(config)``."""
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.PRNGKey(0))
    return {_hf_name(path): (path, tuple(s.shape)) for path, s in traverse_util.flatten_dict(shapes).items()}


def _ignorable(name: str, config: ModelConfig) -> bool:
    """Tensors some checkpoints carry that change nothing: RoPE tables and a tied model's copy of lm_head."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_embeddings)


# ----------------------------------------------------------------------------- load

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _tensor_files(path: Path) -> list[Path]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` names."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if not (path / INDEX_FILE).is_file():
        raise UserError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    weight_map = _read_json(path / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{path / INDEX_FILE} has no weight_map")
    files = [path / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise UserError(f"shard {f.name} named by {INDEX_FILE} is missing from {path}")
    return files


def _read_tensors(files: list[Path], config: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor of the files by HF name (as stored), refusing one our decoder has no place for."""
    expected, tensors = _expected(config), {}
    for f in files:
        try:
            with safe_open(f, framework="np") as st:
                for name in st.keys():
                    if name in expected:
                        tensors[name] = st.get_tensor(name)
                    elif not _ignorable(name, config):
                        raise UserError(f"{f.name} holds tensor {name!r}, for which the decoder of config.json "
                                        "has no parameter")
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e})") from None
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
    """Our float32 params from HF-named tensors (Linear weights transposed to [in, out])."""
    flat = {}
    for name, (path, shape) in _expected(config).items():
        if name not in tensors:
            raise UserError(f"the checkpoint lacks tensor {name!r}")
        value = tensors[name].astype(np.float32)
        value = value.T if path[-1] == "kernel" else value
        if value.shape != shape:
            raise UserError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, but the config implies "
                            f"{shape[::-1] if path[-1] == 'kernel' else shape}")
        flat[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def load_hf_dir(path) -> tuple[ModelConfig, dict]:
    """(config, float32 params) of a Hugging Face checkpoint directory: ``config.json`` plus ``model.safetensors``
    or a sharded ``model.safetensors.index.json`` (any float dtype, bf16 included)."""
    path = Path(path)
    config = config_from_hf(_read_json(path / "config.json"))
    return config, params_from_hf(_read_tensors(_tensor_files(path), config), config)


# ----------------------------------------------------------------------------- save

def params_to_hf(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of our params (kernels transposed to torch's [out, in])."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    expected = {path: shape for path, shape in _expected(config).values()}
    if {p: tuple(np.shape(v)) for p, v in flat.items()} != expected:
        raise UserError("the params do not have the names and shapes of Decoder(config)")
    return {_hf_name(p): np.ascontiguousarray(np.asarray(v, np.float32).T if p[-1] == "kernel" else v,
                                              dtype=np.float32) for p, v in flat.items()}


def save_hf_dir(config: ModelConfig, params, path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``path`` (created), loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(path)``; returns the path."""
    path = Path(path)
    hf = to_hf_config(config)
    tensors = params_to_hf(config, params)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------------- logits

@functools.partial(jax.jit, static_argnums=0)
def logits(config: ModelConfig, params, tokens, attention_mask=None) -> jax.Array:
    """Float32 logits [B,T,V] of tokens [B,T]; ``attention_mask`` [B,T] (1 real, 0 padding) as in HF.

    With a mask, padded keys are hidden and RoPE positions count real tokens from 0 (HF's
    ``cumsum(mask) - 1``), so each row of a left-padded batch scores as it would alone; logits at padded
    positions are meaningless.
    """
    model = Decoder(config)
    if attention_mask is None:
        return model.apply({"params": params}, tokens)
    real = jnp.asarray(attention_mask).astype(bool)
    positions = jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)
    mask = causal_mask(tokens.shape[1]) & real[:, None, :]
    return model.apply({"params": params}, tokens, positions, attn_mask=mask)
