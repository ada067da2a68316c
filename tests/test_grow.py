"""Net2Net growth up the scaling ladder keeps the logits, and the grown model still learns everywhere."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_code.models import get_preset, init_params, logits, loss_fn
from fedjax_code.models.grow import grow
from fedjax_code.models.scales import ModelConfigError


def preset(name, **kw):
    return dataclasses.replace(get_preset(name), vocab_size=96, **kw)


@pytest.mark.parametrize("ladder", [("cpu-0.25", "cpu-0.5", "cpu-1"), ("gpu-0.25", "gpu-0.5")])
@pytest.mark.parametrize("tied", [True, False])
def test_growth_preserves_logits(ladder, tied):
    cfgs = [preset(n, tie_embeddings=tied, dtype="float32") for n in ladder]
    params = init_params(cfgs[0], jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 96)
    want = np.asarray(logits(cfgs[0], params, tokens))
    for src, dst in zip(cfgs, cfgs[1:]):
        params = grow(params, src, dst)
        assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, init_params(dst, jax.random.PRNGKey(0)))
        np.testing.assert_allclose(np.asarray(logits(dst, params, tokens)), want, atol=2e-5, rtol=1e-5)
    batch = jax.random.randint(jax.random.PRNGKey(2), (2, 25), 0, 96)
    grads = jax.grad(loss_fn)(params, cfgs[-1], batch)
    new = f"layers_{cfgs[-1].n_layers - 1}"  # an appended block: an identity that still gets gradients
    assert float(jnp.abs(grads[new]["self_attn"]["o_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads[new]["mlp"]["down_proj"]["kernel"]).max()) > 0


def test_growth_refuses_what_it_cannot_preserve():
    small, other = preset("cpu-0.5"), dataclasses.replace(preset("cpu-1"), d_model=96, n_heads=3, n_kv_heads=3)
    with pytest.raises(ModelConfigError, match="is not a multiple of 64"):
        grow(init_params(small, jax.random.PRNGKey(0)), small, other)
    with pytest.raises(ModelConfigError, match="shrinks"):
        big = preset("cpu-1")
        grow(init_params(big, jax.random.PRNGKey(0)), big, dataclasses.replace(big, d_ff=8))
