"""GGUF checkpoints: tiny llama models written in each supported tensor type load to the logits that transformers'
own GGUF loader gives, the tokenizer rebuilt from the metadata encodes as the original, the real SmolLM2 file
matches transformers within 1e-3, and bad files get one sentence."""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from fedjax_code.data.tokenizer import train_tokenizer
from fedjax_code.errors import UserError
from fedjax_code.models import load_pretrained, logits
from fedjax_code.models.gguf import TENSOR_TYPES, load_gguf, tokenizer_from_gguf

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 12345\n",
         "for i in range(10):\n    print(i ** 2)  # squares\n", "import os\nprint(os.getcwd())\n"] * 8
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
D, HEADS, KV_HEADS = 256, 4, 2  # 256: the K-quants' block is 256 values along a row


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half q/k rows to llama.cpp's interleaved ones."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(kind: Q, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks of a K-quant type (which gguf-py cannot quantize to) with small, finite f16 scales."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (rows * cols // block_values, block_bytes), dtype=np.uint8)
    scale = lambda n: np.frombuffer(np.float16(rng.uniform(1e-3, 4e-3, n)).tobytes(), np.uint8).reshape(n, 2)
    if kind == Q.Q6_K:
        blocks[:, -2:] = scale(len(blocks))  # ql, qh, scales, then d
    else:
        blocks[:, 0:2], blocks[:, 2:4] = scale(len(blocks)), scale(len(blocks))  # d, dmin first
    return blocks.reshape(rows, -1)


def write_gguf(path, model, tokenizer, kind: Q, pre="gpt2", rng=None):
    """``model``'s weights as a llama GGUF: 2-D weights in ``kind`` (K-quants: random blocks), norms in F32."""
    rng = rng or np.random.default_rng(0)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers), w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size), w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads), w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(cfg.rms_norm_eps), w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab]), w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id), w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)
    for name, value in model.state_dict().items():
        value = value.float().numpy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            part, leaf = rest.rsplit(".", 1)
            out = f"blk.{layer}.{GGUF_NAMES[part]}.{leaf}"
            if part == "self_attn.q_proj":
                value = llama_cpp_permute(value, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                value = llama_cpp_permute(value, cfg.num_key_value_heads)
        else:
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}[name]
        if value.ndim == 1 or kind == Q.F32:
            w.add_tensor(out, value.astype(np.float32))
        elif kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(out, random_k_quant(kind, *value.shape, rng), raw_dtype=kind)
        else:
            w.add_tensor(out, gguf.quants.quantize(value, kind), raw_dtype=kind)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def tiny_llama(vocab_size, tied, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, intermediate_size=D, vocab_size=vocab_size,
                                   tie_word_embeddings=tied, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.05)
    return model


def transformers_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("kind", TENSOR_TYPES)
def test_every_tensor_type_gives_transformers_logits(kind, tokenizer, tmp_path):
    path = write_gguf(tmp_path / f"tiny-{kind}.gguf", tiny_llama(len(tokenizer), tied=kind != "Q8_0"), tokenizer,
                      Q[kind])
    config, params, _ = load_gguf(path)
    tokens = np.random.default_rng(1).integers(0, len(tokenizer), (2, 24))
    ours = np.asarray(logits(config, params, tokens))
    ref = transformers_logits(path, tokens)
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), kind


def test_tokenizer_from_metadata_encodes_as_the_original(tokenizer, tmp_path):
    path = write_gguf(tmp_path / "tok.gguf", tiny_llama(len(tokenizer), tied=True), tokenizer, Q.F32)
    _, _, rebuilt = load_gguf(path)
    for text in TEXTS[:4] + ["ünïcödé\ttabs  and   spaces\n\n", "<|eos|> inside"]:
        assert rebuilt.encode(text) == tokenizer.encode(text, add_special_tokens=False), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert (rebuilt.bos_token, rebuilt.eos_token) == (tokenizer.bos_token, tokenizer.eos_token)


def test_smollm_pre_tokenizer_splits_digits_as_llama_cpp():
    """llama.cpp's 'smollm' pre-tokenizer isolates every digit (\\p{N}) before the GPT-2 split."""
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [*"0123456789", "12"],
            "tokenizer.ggml.merges": ["1 2"], "tokenizer.ggml.pre": "smollm"}
    assert tokenizer_from_gguf(meta).tokenize("12") == ["1", "2"]
    assert tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "gpt2"}).tokenize("12") == ["12"]


def test_smollm2_gguf_matches_transformers_gguf_loader():
    """The registered real model (fetched into the cache on first use) against transformers on the same file."""
    from fedjax_code.models.pretrained import fetch_registered

    path = fetch_registered("smollm2-135m-instruct")
    model = load_pretrained("smollm2-135m-instruct")
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = 'def fib(n):\n    """Return the n-th Fibonacci number."""\n'
    tokens = np.array([model.tokenizer.encode(text)])
    assert tokens[0].tolist() == ref_tok.encode(text)
    ours = np.asarray(logits(model.config, model.params, tokens))
    assert np.abs(ours - transformers_logits(path, tokens)).max() <= 1e-3
    assert model.config.n_layers == 30 and model.config.n_kv_heads == 3 and model.config.tie_embeddings


def test_bad_gguf_files_get_one_sentence(tokenizer, tmp_path):
    good = write_gguf(tmp_path / "good.gguf", tiny_llama(len(tokenizer), tied=True), tokenizer, Q.Q8_0)
    data = good.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all" * 10)
    for name in ("truncated.gguf", "garbage.gguf", "missing.gguf"):
        with pytest.raises(UserError) as err:
            load_pretrained(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "gpt2")
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        load_gguf(tmp_path / "arch.gguf")
    with pytest.raises(UserError, match="type Q5_0, which is not supported"):
        load_gguf(write_gguf(tmp_path / "q5_0.gguf", tiny_llama(len(tokenizer), tied=True), tokenizer, Q.Q5_0))
    with pytest.raises(UserError, match="has no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})
    with pytest.raises(UserError, match="pre-tokenizer 'qwen99' is not supported"):
        load_gguf(write_gguf(tmp_path / "pre.gguf", tiny_llama(len(tokenizer), tied=True), tokenizer, Q.F32, pre="qwen99"))
