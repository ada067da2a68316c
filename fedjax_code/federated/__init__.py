"""Vectorised federated-learning core: pure functions over pytrees, generic over
`loss_fn(params, batch) -> scalar`.

A round: sample a cohort (`sample_cohort`, `local_steps`), gather its batches [C, E, ...] into a
`Cohort`, then `round(server_state, cohort_rows, cohort)` of a `FederatedAlgorithm` (all in `REGISTRY`),
jitted once. Per-client state lives in a host-side `ClientStore` (training runs) or stacked on the
device (`FederatedAlgorithm.apply`, jitted with `jit_round`). Learning
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
    deploys_personal,
    message_bytes,
    register,
    BuildContext,
    Models,
    Plateau,
    ditto,
    messengers,
    mutual_distillation,
    fedavg,
    fednova,
    fedprox,
    fedrep,
    pfedme,
    qffl,
    jit_round,
    scaffold,
    server_optimizer,
    with_fresh,
)
from .client_store import ClientStore
from .client import client_optimizer, client_update
from .cohort import client_key, cohort_size, local_steps, sample_cohort
from .schedules import SCHEDULES, lr_factor, server_learning_rate
from .sharding import make_mesh, pad_cohort, replicate, shard_cohort, shard_rows
from .state import ClientStates, Cohort, ServerState, gather, scatter

__all__ = [
    "REGISTRY",
    "SCHEDULES",
    "AlgorithmSpec",
    "algorithm_spec",
    "build_algorithm",
    "communicated_bytes",
    "deploys_personal",
    "message_bytes",
    "register",
    "ClientStates",
    "ClientStore",
    "Cohort",
    "FederatedAlgorithm",
    "ServerState",
    "aggregate",
    "client_key",
    "client_optimizer",
    "client_update",
    "client_weights",
    "cohort_size",
    "BuildContext",
    "Models",
    "Plateau",
    "ditto",
    "messengers",
    "mutual_distillation",
    "fedavg",
    "fednova",
    "fedprox",
    "fedrep",
    "pfedme",
    "qffl",
    "gather",
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
    "shard_rows",
    "weighted_sum",
    "with_fresh",
]
