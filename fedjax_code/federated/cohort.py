"""Cohort sampling and per-client local-step budgets, reproducible from (seed, round).

Keys: round_key = fold_in(PRNGKey(seed), round). Selection uses fold_in(round_key, _SELECT_TAG);
client i's own randomness uses fold_in(round_key, i) (its dropout coin directly, its local-step
draw via a further fold_in), so a client's coin does not depend on who else was sampled.
Client ids must therefore be below _SELECT_TAG = 2**31 - 1.
"""

import builtins
import math

import jax
import jax.numpy as jnp

_SELECT_TAG = 2**31 - 1
_STEPS_TAG = 1


def cohort_size(num_clients: int, participation: float) -> int:
    """C = max(1, round(participation * K))."""
    return max(1, int(builtins.round(participation * num_clients)))


def _round_key(seed, round) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), round)


def client_key(seed, round, client_id) -> jax.Array:
    """fold_in(fold_in(PRNGKey(seed), round), client_id): client-local randomness for a round."""
    return jax.random.fold_in(_round_key(seed, round), client_id)


def sample_cohort(
    seed,
    round,
    num_clients: int,
    participation: float,
    client_sizes=None,
    weighted: bool = False,
    dropout: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Pick C = max(1, round(participation*K)) distinct clients; return (ids [C] int32, mask [C] bool).

    Uniform without replacement, or (weighted=True) without replacement with probability
    proportional to `client_sizes` (successive sampling). Each selected client then drops out
    independently with probability `dropout` (mask False). Jittable with static K/participation.
    """
    c = cohort_size(num_clients, participation)
    key = jax.random.fold_in(_round_key(seed, round), _SELECT_TAG)
    p = None
    if weighted:
        if client_sizes is None:
            raise ValueError("weighted sampling needs client_sizes")
        sizes = jnp.asarray(client_sizes, jnp.float32)
        p = sizes / sizes.sum()
    ids = jax.random.choice(key, num_clients, (c,), replace=False, p=p).astype(jnp.int32)
    coins = jax.vmap(lambda i: jax.random.uniform(client_key(seed, round, i)))(ids)
    return ids, coins >= dropout


def local_steps(seed, round, ids: jax.Array, num_steps: int, mode: str = "fixed", sizes=None) -> jax.Array:
    """step_mask [C, E] bool with the first tau_i steps active, 1 <= tau_i <= E.

    fixed: tau_i = E. random: tau_i uniform in [ceil(E/2), E] from the client's own key.
    proportional: tau_i = clip(ceil(E * n_i / max_j n_j), 1, E), n = `sizes` [K] indexed by id.
    """
    ids = jnp.asarray(ids, jnp.int32)
    e = num_steps
    if mode == "fixed":
        tau = jnp.full(ids.shape, e, jnp.int32)
    elif mode == "random":
        lo = math.ceil(e / 2)
        draw = lambda i: jax.random.randint(jax.random.fold_in(client_key(seed, round, i), _STEPS_TAG), (), lo, e + 1)
        tau = jax.vmap(draw)(ids)
    elif mode == "proportional":
        if sizes is None:
            raise ValueError("proportional local steps need sizes")
        n = jnp.asarray(sizes, jnp.float32)
        tau = jnp.clip(jnp.ceil(e * n[ids] / n.max()), 1, e).astype(jnp.int32)
    else:
        raise ValueError(f"unknown local-steps mode {mode!r}; expected 'fixed', 'random' or 'proportional'")
    return jnp.arange(e)[None, :] < tau[:, None]

