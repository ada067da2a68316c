"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): each client
minimises loss + mu/2 ||w - w_global||^2; the server averages as in FedAvg."""

import jax
import jax.numpy as jnp
import optax

from ..aggregate import aggregate
from ..client import LossFn
from ..schedules import Schedule
from .base import FederatedAlgorithm, client_lr_scale, round_metrics, run_clients, server_step, stateless_init
from .registry import AlgorithmSpec, register


def proximal_term(anchor, mu: float):
    """w -> mu/2 ||w - anchor||^2 (summed over all leaves)."""

    def penalty(params):
        sq = jax.tree.map(lambda w, a: jnp.sum(jnp.square(w - jax.lax.stop_gradient(a))), params, anchor)
        return 0.5 * mu * sum(jax.tree.leaves(sq))

    return penalty


def fedprox(
    loss_fn: LossFn,
    client_opt: optax.GradientTransformation,
    mu: float,
    server_opt: optax.GradientTransformation | None = None,
    parallel: int | None = None,
    client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """FedProx with proximal strength `mu` (mu=0 is FedAvg). The reported train_loss excludes the
    proximal term. Stateless clients; server default optax.sgd(1.0).
    `client_schedule`: round -> client learning-rate factor (`schedules.lr_factor`; None: 1)."""
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt

    def apply(state, client_states, cohort):
        penalty = proximal_term(state.params, mu)
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, loss_fn, penalty=penalty,
                                           parallel=parallel, lr_scale=client_lr_scale(client_schedule, state))
        state = server_step(state, aggregate(deltas, cohort.weights, cohort.mask), server_opt)
        return state, client_states, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(stateless_init(server_opt), apply)


register(AlgorithmSpec("fedprox", "FedProx", lambda f, c:
                       fedprox(c.loss_fn, c.client_opt, f.mu, c.server_opt, c.parallel, c.client_schedule)))
