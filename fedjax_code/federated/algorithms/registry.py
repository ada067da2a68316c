"""The one registry of federated algorithms (like optax's ``alias.py``).

Each entry says what ``federated.algorithm`` may name, how the algorithm is built from a run's federated
config, which server optimiser it applies, what it sends per client and its display name. Config
validation, the run's wiring, communicated bytes and the report all read this registry. An algorithm
module calls ``register`` for its entries, and ``algorithms/__init__`` imports every module of the
package, so adding an algorithm touches its own module and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import optax

from fedjax_code.errors import UserError

from ..client import LossFn, client_optimizer
from ..schedules import Schedule, lr_factor, server_learning_rate
from .base import FederatedAlgorithm, server_optimizer

# (federated config, loss_fn, client optimiser, server optimiser, clients in parallel, client schedule: round ->
# factor of the client lr, see `schedules.lr_factor`) -> FederatedAlgorithm
Builder = Callable[[object, LossFn, optax.GradientTransformation, optax.GradientTransformation, "int | None",
                    Schedule], FederatedAlgorithm]


@dataclass(frozen=True)
class AlgorithmSpec:
    """One registered algorithm."""

    name: str                      # the config value: federated.algorithm = "fedadam"
    display: str                   # the name in reports: "FedAdam"
    build: Builder
    server_optimizer: str = "sgd"  # a `server_optimizer` name; sgd at server_lr 1 is plain averaging
    messages: int = 1              # model-sized messages per client each way (SCAFFOLD: 2, with its control variate)
    sgd_client_only: bool = False  # its update rule assumes plain local SGD


REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"algorithm {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def algorithm_spec(name: str) -> AlgorithmSpec:
    if name not in REGISTRY:
        raise UserError(f"unknown algorithm {name!r}: use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_algorithm(f, loss_fn: LossFn, parallel: int | None = None) -> FederatedAlgorithm:
    """The FederatedAlgorithm that the federated config ``f`` names, with its client and server optimisers.

    ``parallel``: cohort clients trained at once (speed and memory only; see ``base.map_clients``).
    The learning rates follow ``f.client_lr_schedule`` and ``f.server_lr_schedule`` across rounds (``schedules``)."""
    spec = algorithm_spec(f.algorithm)
    client_opt = client_optimizer(f.client_optimizer, f.client_lr, clip_norm=f.clip_norm)
    server_lr = server_learning_rate(f.server_lr_schedule, f.server_lr, f.rounds, f.warmup_rounds, f.final_lr_ratio)
    server_opt = server_optimizer(spec.server_optimizer, server_lr, momentum=f.server_momentum)
    client_schedule = lr_factor(f.client_lr_schedule, f.rounds, f.warmup_rounds, f.final_lr_ratio)
    return spec.build(f, loss_fn, client_opt, server_opt, parallel, client_schedule)


def communicated_bytes(algorithm: str, model_bytes: int, selected: int, participants: int) -> tuple[int, int]:
    """(bytes_up, bytes_down) of one round: ``messages`` models each way, up from participants, down to all selected."""
    factor = algorithm_spec(algorithm).messages
    return participants * model_bytes * factor, selected * model_bytes * factor
