"""Masked weighted averaging of client updates over the leading client axis."""

import jax
import jax.numpy as jnp

from .state import PyTree


def client_weights(num_examples: jax.Array, scheme: str = "examples") -> jax.Array:
    """Unnormalised aggregation weights [C]: example counts ('examples') or ones ('uniform')."""
    n = jnp.asarray(num_examples, jnp.float32)
    if scheme == "examples":
        return n
    if scheme == "uniform":
        return jnp.ones_like(n)
    raise ValueError(f"unknown weighting scheme {scheme!r}; expected 'examples' or 'uniform'")


def normalized_weights(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """p_i = w_i / sum_j w_j over unmasked clients, 0 for masked ones; all zeros if nothing is left."""
    w = jnp.where(mask, weights, 0.0).astype(jnp.float32)
    total = w.sum()
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_sum(tree: PyTree, p: jax.Array, mask: jax.Array) -> PyTree:
    """sum_i p_i x_i over axis 0 with masked rows zeroed first (so NaN/inf there cannot leak)."""

    def reduce(x):
        m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        x32 = jnp.where(m, x, 0).astype(jnp.float32)
        return jnp.tensordot(p.astype(jnp.float32), x32, axes=1).astype(x.dtype)

    return jax.tree.map(reduce, tree)


def aggregate(deltas: PyTree, weights: jax.Array, mask: jax.Array) -> PyTree:
    """Masked weighted mean of `deltas` [C, ...] -> [...]; zeros (not NaN) if every client is masked."""
    return weighted_sum(deltas, normalized_weights(weights, mask), mask)
