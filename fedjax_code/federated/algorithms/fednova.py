"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): normalised averaging for clients running different numbers of steps."""

import jax
import jax.numpy as jnp
import optax

from ..aggregate import normalized_weights, weighted_sum
from ..client import LossFn
from ..schedules import Schedule
from .base import (FederatedAlgorithm, client_lr_scale, per_client, round_metrics, run_clients, server_step,
                   stateless_init)
from .registry import AlgorithmSpec, register


def fednova(
    loss_fn: LossFn, client_opt: optax.GradientTransformation, server_opt: optax.GradientTransformation | None = None,
    parallel: int | None = None, client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """FedNova for a vanilla-SGD local solver (a_i = ones, ||a_i||_1 = tau_i): d_i = delta_i / tau_i,
    tau_eff = sum_i p_i tau_i, update = tau_eff * sum_i p_i d_i with p the normalised cohort weights.
    With equal tau this is FedAvg. `client_opt` should be plain SGD (momentum/Adam change a_i, not
    modelled here). Stateless clients; server default optax.sgd(1.0).
    `client_schedule`: round -> client learning-rate factor (`schedules.lr_factor`; None: 1)."""
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt

    def apply(state, client_states, cohort):
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, loss_fn, parallel=parallel,
                                           lr_scale=client_lr_scale(client_schedule, state))
        p = normalized_weights(cohort.weights, cohort.mask)
        tau = jnp.maximum(taus, 1).astype(jnp.float32)
        normalised = jax.tree.map(lambda d: d / per_client(tau, d).astype(d.dtype), deltas)
        tau_eff = jnp.sum(p * tau)
        update = jax.tree.map(lambda d: (tau_eff * d).astype(d.dtype), weighted_sum(normalised, p, cohort.mask))
        state = server_step(state, update, server_opt)
        return state, client_states, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(stateless_init(server_opt), apply)


register(AlgorithmSpec("fednova", "FedNova", lambda f, c:
                       fednova(c.loss_fn, c.client_opt, c.server_opt, c.parallel, c.client_schedule)))
