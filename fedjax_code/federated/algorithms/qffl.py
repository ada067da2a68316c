"""q-FFL (Li et al. 2020, "Fair Resource Allocation in Federated Learning") as an aggregation reweighting that
combines with any algorithm."""

import jax
import jax.numpy as jnp

from ..client import LossFn
from .base import FederatedAlgorithm


def qffl(algorithm: FederatedAlgorithm, loss_fn: LossFn, q: float) -> FederatedAlgorithm:
    """``algorithm`` with each participant's aggregation weight multiplied by F_i^q, where F_i is its loss on its
    first local batch under the model it is served at the round's start: its personal model when the algorithm
    keeps one (Ditto, FedRep, pFedMe), else the global model. Clients served worse count more; q = 0 leaves the
    weights unchanged.

    This is q-FedAvg's direction, sum_i F_i^q Delta_i, with the weights normalised as the algorithm normalises
    them; q-FedAvg's own step size (its 1 / sum_i h_i from a Lipschitz estimate) is left to the server optimiser.
    """

    def apply(state, rows, cohort):
        first = jax.tree.map(lambda x: x[:, 0], cohort.batches)
        if algorithm.personal is None:
            losses = jax.vmap(loss_fn, in_axes=(None, 0))(state.params, first)
        else:
            losses = jax.vmap(lambda row, b: loss_fn(algorithm.personal(state, row), b))(rows, first)
        weights = cohort.weights * jnp.power(jnp.maximum(losses, 0.0), q).astype(cohort.weights.dtype)
        return algorithm.round(state, rows, cohort._replace(weights=weights))

    return algorithm._replace(round=apply)
