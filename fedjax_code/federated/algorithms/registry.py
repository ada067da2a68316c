"""The one registry of federated algorithms (like optax's ``alias.py``).

Each entry says what ``federated.algorithm`` may name, how the algorithm is built from a run's federated
config, which server optimiser it applies, what it sends per client and its display name. Config
validation, the run's wiring, communicated bytes and the report all read this registry. An algorithm
module calls ``register`` for its entries, and ``algorithms/__init__`` imports every module of the
package, so adding an algorithm touches its own module and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import optax

from fedjax_code.errors import UserError

from ..client import LossFn, client_optimizer
from ..schedules import Schedule, lr_factor, server_learning_rate
from ..state import PyTree
from .base import FederatedAlgorithm, server_optimizer
from .qffl import qffl

class Models(NamedTuple):
    """What an algorithm with two models (the messengers) needs of the run's: the private model's and the
    messenger's logits, (params, tokens [B, T]) -> [B, T, V], a private model's init from a key, and the seed."""

    private_logits: Callable
    messenger_logits: Callable
    init_private: Callable
    seed: int


class BuildContext(NamedTuple):
    """Everything a registered algorithm is built from, besides the federated config."""

    loss_fn: LossFn
    client_opt: optax.GradientTransformation
    server_opt: optax.GradientTransformation
    parallel: int | None            # cohort clients trained at once
    client_schedule: Schedule       # round -> factor of the client lr (`schedules.lr_factor`)
    models: Models | None = None    # for algorithms with ``needs_models``


Builder = Callable[[object, BuildContext], FederatedAlgorithm]  # (federated config, context) -> the algorithm


@dataclass(frozen=True)
class AlgorithmSpec:
    """One registered algorithm."""

    name: str                      # the config value: federated.algorithm = "fedadam"
    display: str                   # the name in reports: "FedAdam"
    build: Builder
    server_optimizer: str = "sgd"  # a `server_optimizer` name; sgd at server_lr 1 is plain averaging
    messages: int = 1              # model-sized messages per client each way (SCAFFOLD: 2, with its control variate)
    sgd_client_only: bool = False  # its update rule assumes plain local SGD
    needs_models: bool = False     # built from the run's `Models` (the messengers)
    sent: Callable[[object, PyTree], PyTree] | None = None  # (federated config, params) -> the part a client sends
    #                                                       # and receives (None: all of it; FedRep: the body)


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


def build_algorithm(f, loss_fn: LossFn, parallel: int | None = None, models: Models | None = None
                    ) -> FederatedAlgorithm:
    """The FederatedAlgorithm that the federated config ``f`` names, with its client and server optimisers.

    ``parallel``: cohort clients trained at once (speed and memory only; see ``base.map_clients``).
    The learning rates follow ``f.client_lr_schedule`` and ``f.server_lr_schedule`` across rounds (``schedules``);
    ``f.qffl_q > 0`` reweights the aggregation by q-FFL (``qffl``)."""
    spec = algorithm_spec(f.algorithm)
    client_opt = client_optimizer(f.client_optimizer, f.client_lr, clip_norm=f.clip_norm)
    server_lr = server_learning_rate(f.server_lr_schedule, f.server_lr, f.rounds, f.warmup_rounds, f.final_lr_ratio)
    server_opt = server_optimizer(spec.server_optimizer, server_lr, momentum=f.server_momentum)
    client_schedule = lr_factor(f.client_lr_schedule, f.rounds, f.warmup_rounds, f.final_lr_ratio)
    if spec.needs_models and models is None:
        raise UserError(f"{spec.display} is built from the run's models; pass models=Models(...)")
    algorithm = spec.build(f, BuildContext(loss_fn, client_opt, server_opt, parallel, client_schedule, models))
    return qffl(algorithm, loss_fn, f.qffl_q) if f.qffl_q else algorithm


def _sent(f, params: PyTree) -> PyTree:
    spec = algorithm_spec(f.algorithm)
    return params if spec.sent is None else spec.sent(f, params)


def message_bytes(f, params: PyTree) -> int:
    """Bytes of one model-sized message of the algorithm ``f`` names: the part of ``params`` it sends."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(_sent(f, params)))


def deploys_personal(f, params: PyTree) -> bool:
    """Whether a client of the algorithm ``f`` names would deploy its personal model rather than the server's:
    the server never holds some trained part of ``params`` (FedRep's heads stay on the clients, so its server
    model's head is still at initialisation)."""
    return len(jax.tree.leaves(_sent(f, params))) < len(jax.tree.leaves(params))


def communicated_bytes(algorithm: str, model_bytes: int, selected: int, participants: int) -> tuple[int, int]:
    """(bytes_up, bytes_down) of one round: ``messages`` messages of ``model_bytes`` (`message_bytes`) each way, up
    from participants, down to all selected."""
    factor = algorithm_spec(algorithm).messages
    return participants * model_bytes * factor, selected * model_bytes * factor
