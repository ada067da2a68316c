"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"): FedAvg for the
global model, and beside it a personal model per client pulled toward the global one."""

import jax
import jax.numpy as jnp
import optax

from ..aggregate import aggregate
from ..client import LossFn, client_update
from ..schedules import Schedule
from .base import (FederatedAlgorithm, client_lr_scale, cohort_mean, map_clients, round_metrics, run_clients,
                   server_step, stateless_init)
from .registry import AlgorithmSpec, register


def ditto(
    loss_fn: LossFn, client_opt: optax.GradientTransformation, lam: float, client_lr: float,
    server_opt: optax.GradientTransformation | None = None, parallel: int | None = None,
    client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """Ditto: each cohort client runs FedAvg's local update of the global model w and, on the same batches, updates
    its personal model v to minimise f(v) + lam/2 ||v - w||^2, with w the global model at the round's start.

    The pull is applied as a proximal step after every local step, v <- (v + eta lam w) / (1 + eta lam) with eta
    this round's client lr (the paper takes a gradient step on the penalty; the proximal form agrees to first
    order in eta lam and stays stable for any lam, so lam -> infinity keeps v = w). A client's personal model
    starts as the global model of the round it first trains in. Only the global update is sent.
    """
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt

    def apply(state, personal, cohort):
        scale = client_lr_scale(client_schedule, state)
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, loss_fn, parallel=parallel,
                                           lr_scale=scale)
        pull = client_lr * scale * lam

        def to_global(v):
            return jax.tree.map(lambda x, w: ((x + pull * w) / (1 + pull)).astype(x.dtype), v, state.params)

        def personal_update(xs):
            v, batches, step_mask = xs
            d, loss, _ = client_update(v, batches, step_mask, client_opt, loss_fn, lr_scale=scale, prox=to_global)
            return jax.tree.map(jnp.add, v, d), loss

        personal, personal_losses = map_clients(personal_update, (personal, cohort.batches, cohort.step_mask),
                                                parallel)
        state = server_step(state, aggregate(deltas, cohort.weights, cohort.mask), server_opt)
        metrics = {**round_metrics(losses, taus, cohort), "personal_train_loss": cohort_mean(personal_losses, cohort)}
        return state, personal, metrics

    return FederatedAlgorithm(stateless_init(server_opt), apply, init_client=lambda state, client_id: state.params,
                              personal=lambda state, v: v)


register(AlgorithmSpec("ditto", "Ditto", lambda f, c: ditto(
    c.loss_fn, c.client_opt, f.ditto_lambda, f.client_lr, c.server_opt, c.parallel, c.client_schedule)))
