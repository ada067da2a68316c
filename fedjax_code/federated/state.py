"""State pytrees for vectorised federated rounds: server state, per-client state and the cohort.

Everything here is a plain pytree, so it can be jitted, vmapped, donated and sharded.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any
ClientStates = PyTree
"""Per-client algorithm state (e.g. SCAFFOLD's c_i): a pytree whose leaves are stacked [K, ...]."""


@struct.dataclass
class ServerState:
    """Global state shared by every algorithm.

    params: the global model; opt_state: the server optax state; round: int32 scalar, rounds done;
    extras: algorithm-specific pytree (e.g. SCAFFOLD's global control variate c) or None.
    """

    params: PyTree
    opt_state: PyTree
    round: jax.Array
    extras: PyTree = None


class Cohort(NamedTuple):
    """The clients of one round, stacked on a leading client axis C.

    ids [C] int32; mask [C] bool (False: padded or dropped, no influence); weights [C] float32
    aggregation weights (unnormalised, e.g. example counts); batches: pytree of leaves [C, E, ...]
    (E local steps); step_mask [C, E] bool (False: padded local step, a no-op).
    """

    ids: jax.Array
    mask: jax.Array
    weights: jax.Array
    batches: PyTree
    step_mask: jax.Array


def gather(client_states: ClientStates, ids: jax.Array) -> PyTree:
    """Rows `ids` of every leaf: [K, ...] -> [C, ...]."""
    return jax.tree.map(lambda s: s[ids], client_states)


def scatter(client_states: ClientStates, ids: jax.Array, new_rows: PyTree, mask: jax.Array) -> ClientStates:
    """Write `new_rows` [C, ...] into rows `ids`; rows where `mask` is False are left unchanged.

    Masked rows are routed out of bounds and dropped, so padded clients may repeat any id. Ids of
    unmasked rows must be distinct.
    """
    def put(s, r):
        return s.at[jnp.where(mask, ids, s.shape[0])].set(r.astype(s.dtype), mode="drop")

    return jax.tree.map(put, client_states, new_rows)
