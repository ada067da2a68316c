"""GGUF checkpoints (llama.cpp's format) of the ``llama`` architecture into the one ``Decoder``.

The ``gguf`` package reads the file and dequantizes its tensors (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K,
Q6_K) to float32. GGUF names map onto Hugging Face ones (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.
q_proj.weight``) and ``hf.params_from_hf`` does the rest. llama.cpp's converter (``convert_hf_to_gguf.py``,
``LlamaModel.permute``) reorders the rows of q and k from HF's rotate-half RoPE layout to its interleaved one;
``_unpermute`` restores HF's. The tokenizer is rebuilt from the metadata (tokens, merges, token types, special
ids) as an HF fast tokenizer, splitting text the way llama.cpp does for the file's ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fedjax_code.errors import UserError
from fedjax_code.models.hf import params_from_hf
from fedjax_code.models.scales import ModelConfig

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_LAYER_NAMES = {  # GGUF block tensor -> HF name inside model.layers.{i}
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = ("rope_freqs",)  # llama-3 RoPE scaling factors: refused through the metadata instead

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp splits text with, in order (llama-vocab.cpp)
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "gpt-2": [_GPT2_SPLIT],
    **{name: [r"\p{N}", _GPT2_SPLIT] for name in ("smollm", "starcoder", "refact", "codeshell", "command-r")},
    **{name: [_LLAMA3_SPLIT] for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")},
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


# ----------------------------------------------------------------------------- reading

def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError, struct/IndexError or numpy errors on bad bytes
        raise UserError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None


def _metadata(reader) -> dict:
    """Every metadata field as a Python value (strings, numbers and lists of them)."""
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field of a type this gguf version cannot render: not one we read
            continue
    return out


def _get(meta: dict, key: str):
    if key not in meta:
        raise UserError(f"the GGUF metadata lacks {key!r}")
    return meta[key]


def config_from_gguf(meta: dict, tensor_names: set[str]) -> ModelConfig:
    """The float32 ``ModelConfig`` of a ``llama``-architecture GGUF's metadata; untied iff it has output.weight."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported; only 'llama' is")
    p = "llama."
    if meta.get(p + "rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise UserError("GGUF files with scaled RoPE are not supported; only plain RoPE is")
    d_model, n_heads = _get(meta, p + "embedding_length"), _get(meta, p + "attention.head_count")
    head_dim = meta.get(p + "attention.key_length", d_model // n_heads)
    if meta.get(p + "rope.dimension_count", head_dim) != head_dim:
        raise UserError("GGUF files whose RoPE spans only part of each head are not supported")
    vocab = meta.get(p + "vocab_size") or len(_get(meta, "tokenizer.ggml.tokens"))
    return ModelConfig(
        vocab_size=int(vocab), d_model=d_model, n_layers=_get(meta, p + "block_count"), n_heads=n_heads,
        n_kv_heads=meta.get(p + "attention.head_count_kv", n_heads), d_ff=_get(meta, p + "feed_forward_length"),
        max_len=_get(meta, p + "context_length"), rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_names, dtype="float32",
        norm_eps=float(_get(meta, p + "attention.layer_norm_rms_epsilon")),
        head_dim_override=None if head_dim * n_heads == d_model else head_dim)


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, or None for one we do not know."""
    stem, _, leaf = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{leaf}" if part in _LAYER_NAMES else None
    return f"{_GLOBAL_NAMES[stem]}.{leaf}" if stem in _GLOBAL_NAMES else None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation: per head, rows (pairs interleaved) back to (halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise UserError(f"tensor {tensor.name!r} has type {kind}, which is not supported; "
                        f"use one of {', '.join(TENSOR_TYPES)}")
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost first
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)


def _tensors(reader, config: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32 and un-permuted, by HF name."""
    out = {}
    for tensor in reader.tensors:
        if tensor.name.split(".")[0] in _IGNORED:
            continue
        name = hf_name(tensor.name)
        if name is None:
            raise UserError(f"GGUF tensor {tensor.name!r} has no place in the llama decoder")
        try:
            value = _dequantize(tensor)
        except ValueError as err:
            raise UserError(f"tensor {tensor.name!r} cannot be read ({err}); the file is damaged") from None
        if tensor.name.endswith("attn_q.weight"):
            value = _unpermute(value, config.n_heads)
        elif tensor.name.endswith("attn_k.weight"):
            value = _unpermute(value, config.n_kv_heads)
        out[name] = value
    return out


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_from_gguf(meta: dict) -> PreTrainedTokenizerFast:
    """A byte-level BPE fast tokenizer from ``tokenizer.ggml.*`` (model ``gpt2``): the vocabulary and merges,
    control tokens as special tokens, user-defined ones as added tokens, llama.cpp's pre-tokenizer split for
    ``tokenizer.ggml.pre``, BOS prepended when ``add_bos_token`` says so."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise UserError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported; use one of {', '.join(PRE_TOKENIZER_SPLITS)}")
    tokens, types = _get(meta, "tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in _get(meta, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([t for t, k in zip(tokens, types) if k == USER_DEFINED])

    def special(name):
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = special("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tokens.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=special("eos"),
                                   unk_token=special("unknown"), pad_token=special("padding"),
                                   clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- entry point

def load_gguf(path) -> tuple[ModelConfig, dict, PreTrainedTokenizerFast]:
    """(config, float32 params, tokenizer) of a ``llama``-architecture GGUF file."""
    reader = _reader(Path(path))
    meta = _metadata(reader)
    config = config_from_gguf(meta, {t.name for t in reader.tensors})
    tokenizer = tokenizer_from_gguf(meta)
    return config, params_from_hf(_tensors(reader, config), config), tokenizer
