"""Device placement for federated rounds: the only module that names devices.

The cohort's client axis is split over a 1-D mesh axis 'clients', and so are the cohort's rows of
per-client state (`shard_rows`); params and the server state are replicated. Algorithm code is
unchanged: the jitted round follows the inputs' shardings, so the same round runs on 1 or N devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .state import Cohort, PyTree

CLIENT_AXIS = "clients"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named 'clients' over the first `num_devices` devices (default: all)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices but {len(devices)} are available")
    return Mesh(np.asarray(devices[:n]), (CLIENT_AXIS,))


def _pad_rows(x, pad: int, fill=None):
    """Append `pad` rows: copies of row 0 (fill=None) or a constant."""
    xp = np if isinstance(x, np.ndarray) else jnp
    extra = xp.repeat(x[:1], pad, axis=0) if fill is None else xp.full((pad,) + x.shape[1:], fill, x.dtype)
    return xp.concatenate([x, extra], axis=0)


def pad_cohort(cohort: Cohort, multiple: int) -> Cohort:
    """Pad the client axis C up to a multiple of `multiple` with masked clients.

    Padded clients copy client 0's id and data (so no NaN appears) but have mask False, weight 0
    and no active local steps: they have no influence on the round.
    """
    c = cohort.ids.shape[0]
    pad = -c % multiple
    if pad == 0:
        return cohort
    return Cohort(
        ids=_pad_rows(cohort.ids, pad),
        mask=_pad_rows(cohort.mask, pad, False),
        weights=_pad_rows(cohort.weights, pad, 0),
        batches=jax.tree.map(lambda x: _pad_rows(x, pad), cohort.batches),
        step_mask=_pad_rows(cohort.step_mask, pad, False),
    )


def shard_cohort(cohort: Cohort, mesh: Mesh) -> Cohort:
    """Put axis 0 of every cohort leaf on NamedSharding(mesh, P('clients')); C must divide evenly."""
    n = mesh.shape[CLIENT_AXIS]
    c = cohort.ids.shape[0]
    if c % n:
        raise ValueError(f"cohort of {c} clients does not split over {n} devices; use pad_cohort first")
    return shard_rows(cohort, mesh)


def shard_rows(tree: PyTree, mesh: Mesh) -> PyTree:
    """Put axis 0 (the cohort's clients) of every leaf on NamedSharding(mesh, P('clients')): per-client rows
    placed like the cohort they belong to."""
    return jax.device_put(tree, NamedSharding(mesh, P(CLIENT_AXIS)))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Replicate every leaf on all devices of `mesh` (params, server state, client states)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))
