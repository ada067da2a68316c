"""Federated algorithms as `FederatedAlgorithm(init, apply)` factories over a generic loss_fn.

Every module of this package is imported here, so the entries it registers (see ``registry``) exist
as soon as the package does.
"""

import importlib
import pkgutil

from .base import (FederatedAlgorithm, jit_round, round_metrics, run_clients, server_init, server_optimizer,
                   server_step, with_fresh)
from .fedavg import fedavg
from .fednova import fednova
from .fedprox import fedprox, proximal_term
from .ditto import ditto
from .messengers import Plateau, messengers, mutual_distillation
from .fedrep import fedrep
from .pfedme import pfedme
from .qffl import qffl
from .registry import (REGISTRY, AlgorithmSpec, BuildContext, Models, algorithm_spec, build_algorithm,
                       communicated_bytes, deploys_personal, message_bytes, register)
from .scaffold import scaffold

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "REGISTRY",
    "AlgorithmSpec",
    "FederatedAlgorithm",
    "algorithm_spec",
    "build_algorithm",
    "communicated_bytes",
    "deploys_personal",
    "message_bytes",
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
    "jit_round",
    "proximal_term",
    "register",
    "round_metrics",
    "run_clients",
    "scaffold",
    "server_init",
    "server_optimizer",
    "server_step",
    "with_fresh",
]
