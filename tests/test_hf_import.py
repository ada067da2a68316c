"""Hugging Face checkpoints in and out of the decoder: logits equal transformers' PyTorch models (llama, mistral,
qwen2, qwen3), sharded and bf16 files, the export round trip, and one-sentence errors for bad input."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from fedjax_code.errors import UserError
from fedjax_code.models import (
    ModelConfig, config_from_hf, init_params, load_hf_dir, logits, num_params, param_count, save_hf_dir, to_hf_config,
)
from fedjax_code.models.hf import params_to_hf

TOL = 1e-4
VOCAB = 257
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=VOCAB)
CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
CASES = {  # name: (model_type, config overrides)
    "llama": ("llama", dict(rms_norm_eps=1e-5, rope_theta=500000.0)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral-window": ("mistral", dict(sliding_window=24)),  # max_len capped at the window: the window never acts
    "qwen2": ("qwen2", dict(rope_theta=1e6)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-head_dim-32": ("qwen3", dict(head_dim=32)),  # n_heads * head_dim = 128 != hidden_size
    "qwen3-tied": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
}


def torch_model(model_type, seed=0, **overrides):
    """A tiny random transformers model, weights spread out (norms ~U(0.5, 1.5), the rest ~N(0, 0.1)) so that
    attention is far from uniform and every parameter matters."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type](**SIZES, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.1)
    return model


def torch_logits(model, tokens, mask=None):
    kw = {}
    if mask is not None:
        kw = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0)))
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), **kw).logits.float().numpy()


def left_padded(rng, lengths, pad_id=0):
    width = max(lengths)
    tokens, mask = np.full((len(lengths), width), pad_id, np.int64), np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, width - n:], mask[row, width - n:] = rng.integers(1, VOCAB, n), 1
    return tokens, mask


def max_diff(a, b, mask=None):
    d = np.abs(np.asarray(a) - np.asarray(b))
    return float((d if mask is None else d[mask.astype(bool)]).max())


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A saved tiny llama checkpoint (single file) and its torch model, shared by the bad-input tests."""
    model = torch_model("llama")
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    model = torch_model(model_type, **overrides)
    model.save_pretrained(tmp_path)
    config, params = load_hf_dir(tmp_path)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    assert num_params(params) == sum(p.numel() for p in model.parameters()) == param_count(config)["params_total"]
    rng = np.random.default_rng(0)
    diffs = []
    for tokens in (rng.integers(0, VOCAB, (2, 16)), rng.integers(0, VOCAB, (1, 1))):
        ref = torch_logits(model, tokens)
        assert ref.std() > 0.3  # far from the near-uniform logits of a fresh init
        diffs.append(max_diff(logits(config, params, jnp.asarray(tokens)), ref))
    tokens, mask = left_padded(rng, [5, 12, 9])
    ours = logits(config, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    diffs.append(max_diff(ours, torch_logits(model, tokens, mask), mask))
    alone = logits(config, params, jnp.asarray(tokens[:1, -5:]))  # the 5-token row scores as it would alone
    diffs.append(max_diff(ours[:1, -5:], alone))
    print(f"{case}: max |ours - torch| = {max(diffs):.2e}")  # shown with pytest -s
    assert max(diffs) <= TOL, diffs


def test_config_mapping():
    hf = lambda model_type, **kw: CONFIGS[model_type](**SIZES, **kw).to_dict()
    llama = config_from_hf(hf("llama", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=128))
    assert llama == ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                max_len=128, rope_theta=500000.0, tie_embeddings=False, norm_eps=1e-5)
    assert config_from_hf(hf("mistral", sliding_window=24)).max_len == 24
    assert config_from_hf(hf("mistral", sliding_window=None, max_position_embeddings=99)).max_len == 99
    assert config_from_hf(hf("qwen2", use_sliding_window=True, sliding_window=32)).max_len == 32
    q2, q3 = config_from_hf(hf("qwen2")), config_from_hf(hf("qwen3", head_dim=32))
    assert q2.attention_bias and not q2.qk_norm and q2.head_dim_override is None
    assert q3.qk_norm and not q3.attention_bias and q3.head_dim == 32
    legacy = {k: v for k, v in hf("qwen2").items() if k != "rope_parameters"} | dict(rope_theta=1e6, rope_scaling=None)
    assert config_from_hf(legacy).rope_theta == 1e6  # transformers 4 configs: rope_theta at the top level


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope scaling 'llama3'"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope scaling 'linear'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_bias=True), "attention_bias is not supported for llama"),
    (dict(hidden_size=None), "lacks 'hidden_size'"),
])
def test_unsupported_configs_are_refused(change, match):
    hf = transformers.LlamaConfig(**SIZES).to_dict() | change
    with pytest.raises(UserError, match=match) as e:
        config_from_hf(hf)
    assert "\n" not in str(e.value)


def test_sharded_and_bf16_checkpoints(saved_llama, tmp_path):
    path, model = saved_llama
    config, params = load_hf_dir(path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    config_s, params_s = load_hf_dir(tmp_path / "sharded")
    assert config_s == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_s, params)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float32)
    config_b, params_b = load_hf_dir(tmp_path / "bf16")
    assert config_b == config and all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params_b))
    ours = params_to_hf(config_b, params_b)
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(ours[name], tensor.to(torch.bfloat16).float().numpy())


def perturbed(config, seed=0):
    """init_params plus N(0, 0.1) noise on every leaf: biases and norm scales are not their init constants."""
    params = init_params(config, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


EXPORTS = {
    "llama": ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96, max_len=64,
                         tie_embeddings=False, rope_theta=5e5),
    "qwen2": ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_len=64,
                         tie_embeddings=True, attention_bias=True, norm_eps=1e-6),
    "qwen3": ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=96, max_len=64,
                         tie_embeddings=False, qk_norm=True, head_dim_override=24),
}


@pytest.mark.parametrize("model_type", list(EXPORTS))
def test_export_round_trip(model_type, tmp_path):
    config = EXPORTS[model_type]
    params = perturbed(config)
    assert param_count(config)["params_total"] == num_params(params)
    save_hf_dir(config, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model).__name__ == to_hf_config(config)["architectures"][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    diff = max_diff(logits(config, params, jnp.asarray(tokens)), torch_logits(model.eval(), tokens))
    print(f"export {model_type}: max |ours - torch| = {diff:.2e}")
    assert diff <= TOL
    config_back, params_back = load_hf_dir(tmp_path)
    assert config_back == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_back, params)


@pytest.mark.parametrize("kw", [dict(attention_bias=True), dict(qk_norm=True), dict(head_dim_override=12),
                                dict(attention_bias=True, head_dim_override=10, n_kv_heads=1, tie_embeddings=True)])
def test_param_count_of_the_options(kw):
    config = dataclasses.replace(EXPORTS["llama"], **kw)
    assert param_count(config)["params_total"] == num_params(init_params(config, jax.random.PRNGKey(0)))


def copy_of(saved, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    return path


def rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    save_file(edit(tensors), path / "model.safetensors", metadata={"format": "pt"})


def truncate(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def drop_tensor(name):
    return lambda path: rewrite_tensors(path, lambda t: {k: v for k, v in t.items() if k != name})


def set_tensor(name, value):
    return lambda path: rewrite_tensors(path, lambda t: t | {name: value})


def edit_config(path, **change):
    (path / "config.json").write_text(json.dumps(json.loads((path / "config.json").read_text()) | change))


UP = "model.layers.1.mlp.up_proj.weight"
O_BIAS = "model.layers.0.self_attn.o_proj.bias"
BAD_DIRS = {  # name: (how to break a copy of the checkpoint, the error's words)
    "truncated": (truncate, "is not a readable safetensors file"),
    "garbage": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 7), "is not a readable safetensors file"),
    "missing tensor": (drop_tensor(UP), f"lacks tensor '{UP}'"),
    "extra tensor": (set_tensor(O_BIAS, np.zeros(64, np.float32)), f"holds tensor '{O_BIAS}'"),
    "wrong shape": (set_tensor("model.norm.weight", np.ones(63, np.float32)), r"'model.norm.weight' has shape \(63"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "has neither model.safetensors"),
    "no config": (lambda p: (p / "config.json").unlink(), "config.json does not exist"),
    "bad json": (lambda p: (p / "config.json").write_text("{"), "is not valid JSON"),
    "model_type": (lambda p: edit_config(p, model_type="gpt2"), "model_type 'gpt2' is not supported"),
}


@pytest.mark.parametrize("bad", list(BAD_DIRS))
def test_bad_checkpoints_give_one_sentence(bad, saved_llama, tmp_path):
    break_it, match = BAD_DIRS[bad]
    path = copy_of(saved_llama[0], tmp_path)
    break_it(path)
    with pytest.raises(UserError, match=match) as e:
        load_hf_dir(path)
    assert "\n" not in str(e.value)


def test_missing_shard_gives_one_sentence(saved_llama, tmp_path):
    saved_llama[1].save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=f"shard {shard.name} named by model.safetensors.index.json is missing"):
        load_hf_dir(tmp_path)


def test_save_refuses_mismatched_params(tmp_path):
    config = EXPORTS["llama"]
    with pytest.raises(UserError, match="do not have the names and shapes"):
        save_hf_dir(config, init_params(dataclasses.replace(config, d_ff=64), jax.random.PRNGKey(0)), tmp_path)
    with pytest.raises(UserError, match="both q/k norms and q/k/v-only biases"):
        save_hf_dir(dataclasses.replace(config, qk_norm=True, attention_bias=True), {}, tmp_path)
