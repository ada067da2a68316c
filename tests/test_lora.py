"""LoRA on the one decoder: a new adapter leaves the base's logits exactly, the merged model equals the unmerged
one, gradients reach the adapters only, and bad settings get one sentence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_code.models import ModelConfig, ModelConfigError, init_params, logits, loss_fn, num_params, param_count
from fedjax_code.models import lora

BASE = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 16))


def adapted(seed=1, random_b=True):
    """Base params of BASE with fresh LORA adapters (lora_b random when ``random_b``)."""
    base = init_params(BASE, jax.random.PRNGKey(0))
    _, adapters = lora.split(init_params(LORA, jax.random.PRNGKey(seed)))
    if random_b:
        adapters = jax.tree_util.tree_map_with_path(
            lambda path, x: jax.random.normal(jax.random.PRNGKey(len(path)), x.shape) * 0.1
            if path[-1].key == "lora_b" else x, adapters)
    return base, adapters


def test_a_new_adapter_gives_the_base_logits_exactly():
    base, adapters = adapted(random_b=False)
    np.testing.assert_array_equal(logits(LORA, lora.join(base, adapters), TOKENS), logits(BASE, base, TOKENS))
    # 2 layers x r=4 x (in + out) per target: q 32->32, k/v 32->16, o 32->32, gate/up 32->64, down 64->32
    assert num_params(adapters) == 2 * 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))
    counts = param_count(LORA)
    assert counts["params_lora"] == counts["params_trainable"] == num_params(adapters)
    assert counts["params_total"] == num_params(base) and param_count(BASE)["params_trainable"] == num_params(base)


def test_merged_model_equals_unmerged():
    base, adapters = adapted()
    unmerged = logits(LORA, lora.join(base, adapters), TOKENS)
    config, merged = lora.merge(LORA, lora.join(base, adapters))
    assert config == BASE and jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(logits(config, merged, TOKENS), unmerged, atol=1e-5)
    assert np.abs(np.asarray(unmerged) - np.asarray(logits(BASE, base, TOKENS))).max() > 1e-3  # adapters act


def test_gradients_reach_the_adapters_only():
    base, adapters = adapted()
    batch = jnp.asarray(TOKENS)
    grads = jax.grad(lambda a: loss_fn(lora.join(base, a), LORA, batch))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    full = jax.grad(lambda p: loss_fn(p, LORA, batch))(lora.join(base, adapters))
    frozen, trained = lora.split(full)
    jax.tree.map(np.testing.assert_allclose, trained, grads)  # the same adapter gradients as through the full tree
    assert lora.join(*lora.split(full)).keys() == full.keys()


@pytest.mark.parametrize("change, sentence", [
    (dict(lora_rank=4, lora_targets=("q", "attn")), "lora_targets must name some of"),
    (dict(lora_rank=33), "lora_rank 33 exceeds the width 32 of the q projection"),
    (dict(lora_rank=20, lora_targets=("k",)), "exceeds the width 16 of the k projection"),
    (dict(lora_rank=-1), "lora_rank must be a non-negative integer"),
    (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha must be positive"),
])
def test_bad_lora_settings_are_refused(change, sentence):
    with pytest.raises(ModelConfigError, match=sentence):
        dataclasses.replace(BASE, **change)
