"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") with pluggable server optimisers: FedAvgM, FedAdam, FedYogi, FedAdagrad
(Reddi et al. 2021, "Adaptive Federated Optimization")."""

import optax

from ..aggregate import aggregate
from ..client import LossFn
from ..schedules import Schedule
from .base import FederatedAlgorithm, client_lr_scale, round_metrics, run_clients, server_step, stateless_init
from .registry import AlgorithmSpec, register


def fedavg(
    loss_fn: LossFn, client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation | None = None,
    parallel: int | None = None, client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """FedAvg: each client runs its local optimiser, the server applies `server_opt` (default
    optax.sgd(1.0), i.e. x <- x + weighted mean delta) to -mean delta. Stateless clients.
    `client_schedule`: round -> client learning-rate factor (`schedules.lr_factor`; None: 1)."""
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt

    def apply(state, client_states, cohort):
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, loss_fn, parallel=parallel,
                                           lr_scale=client_lr_scale(client_schedule, state))
        state = server_step(state, aggregate(deltas, cohort.weights, cohort.mask), server_opt)
        return state, client_states, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(stateless_init(server_opt), apply)


def _build(f, c):
    return fedavg(c.loss_fn, c.client_opt, c.server_opt, c.parallel, c.client_schedule)


register(AlgorithmSpec("fedavg", "FedAvg", _build))
for _name, _display in (("fedavgm", "FedAvgM"), ("fedadam", "FedAdam"), ("fedyogi", "FedYogi"),
                        ("fedadagrad", "FedAdagrad")):
    register(AlgorithmSpec(_name, _display, _build, server_optimizer=_name))
