"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") with pluggable server optimisers: FedAvgM, FedAdam, FedYogi, FedAdagrad
(Reddi et al. 2021, "Adaptive Federated Optimization")."""

import optax

from ..aggregate import aggregate
from ..client import LossFn
from .base import FederatedAlgorithm, round_metrics, run_clients, server_step, stateless_init


def server_optimizer(
    name: str = "sgd", lr: float = 1.0, momentum: float = 0.0, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3
) -> optax.GradientTransformation:
    """Server optimiser applied to the pseudo-gradient -mean_delta.

    'sgd'/'fedavg': optax.sgd(lr) (lr=1 is plain FedAvg); 'fedavgm': optax.sgd(lr, momentum);
    'fedadam': optax.adam; 'fedyogi': optax.yogi; 'fedadagrad': optax.adagrad with accumulator
    started at eps**2 (the paper's v_{-1} = tau^2; optax puts its own eps inside the sqrt, set to 0
    here, and has no first-moment term). eps defaults to the paper's tau = 1e-3, b2 to 0.99.
    """
    name = name.lower()
    if name in ("sgd", "fedavg"):
        return optax.sgd(lr)
    if name in ("fedavgm", "momentum"):
        return optax.sgd(lr, momentum=momentum)
    if name in ("fedadam", "adam"):
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name in ("fedyogi", "yogi"):
        return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
    if name in ("fedadagrad", "adagrad"):
        return optax.adagrad(lr, initial_accumulator_value=eps**2, eps=0.0)
    raise ValueError(f"unknown server optimizer {name!r}")


def fedavg(
    loss_fn: LossFn, client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation | None = None,
    parallel: int | None = None,
) -> FederatedAlgorithm:
    """FedAvg: each client runs its local optimiser, the server applies `server_opt` (default
    optax.sgd(1.0), i.e. x <- x + weighted mean delta) to -mean delta. Stateless clients."""
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt

    def apply(state, client_states, cohort):
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, loss_fn, parallel=parallel)
        state = server_step(state, aggregate(deltas, cohort.weights, cohort.mask), server_opt)
        return state, client_states, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(stateless_init(server_opt), apply)
