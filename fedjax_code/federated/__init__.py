"""Vectorised federated-learning core: pure functions over pytrees, generic over
`loss_fn(params, batch) -> scalar`.

A round: sample a cohort (`sample_cohort`, `local_steps`), gather its batches [C, E, ...] into a
`Cohort`, then `apply(server_state, client_states, cohort)` of a `FederatedAlgorithm`
(fedavg / fedprox / scaffold / fednova, all in `REGISTRY`), jitted once with `jit_round`. Learning
rates may follow a schedule across rounds (`lr_factor`, `server_learning_rate`).
"""

from .aggregate import aggregate, client_weights, normalized_weights, weighted_sum
from .algorithms import (
    REGISTRY,
    AlgorithmSpec,
    FederatedAlgorithm,
    algorithm_spec,
    build_algorithm,
    communicated_bytes,
    register,
    fedavg,
    fednova,
    fedprox,
    jit_round,
    scaffold,
    server_optimizer,
)
from .client import client_optimizer, client_update
from .cohort import client_key, cohort_size, local_steps, sample_cohort
from .schedules import SCHEDULES, lr_factor, server_learning_rate
from .sharding import make_mesh, pad_cohort, replicate, shard_cohort
from .state import ClientStates, Cohort, ServerState, gather, init_client_states, scatter

__all__ = [
    "REGISTRY",
    "SCHEDULES",
    "AlgorithmSpec",
    "algorithm_spec",
    "build_algorithm",
    "communicated_bytes",
    "register",
    "ClientStates",
    "Cohort",
    "FederatedAlgorithm",
    "ServerState",
    "aggregate",
    "client_key",
    "client_optimizer",
    "client_update",
    "client_weights",
    "cohort_size",
    "fedavg",
    "fednova",
    "fedprox",
    "gather",
    "init_client_states",
    "jit_round",
    "local_steps",
    "lr_factor",
    "make_mesh",
    "normalized_weights",
    "pad_cohort",
    "replicate",
    "sample_cohort",
    "scaffold",
    "scatter",
    "server_learning_rate",
    "server_optimizer",
    "shard_cohort",
    "weighted_sum",
]
