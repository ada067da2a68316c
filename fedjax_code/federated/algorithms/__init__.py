"""Federated algorithms as `FederatedAlgorithm(init, apply)` factories over a generic loss_fn."""

from .base import FederatedAlgorithm, jit_round, round_metrics, run_clients, server_init, server_step
from .fedavg import fedavg, server_optimizer
from .fednova import fednova
from .fedprox import fedprox, proximal_term
from .scaffold import scaffold

__all__ = [
    "FederatedAlgorithm",
    "fedavg",
    "fednova",
    "fedprox",
    "jit_round",
    "proximal_term",
    "round_metrics",
    "run_clients",
    "scaffold",
    "server_init",
    "server_optimizer",
    "server_step",
]
