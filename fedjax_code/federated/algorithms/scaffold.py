"""SCAFFOLD, option II (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning")."""

import jax
import jax.numpy as jnp
import optax

from ..aggregate import aggregate, weighted_sum
from ..client import LossFn
from ..schedules import Schedule
from .base import (FederatedAlgorithm, client_lr_scale, per_client, round_metrics, run_clients, server_init,
                   server_step)
from .registry import AlgorithmSpec, register


def scaffold(
    loss_fn: LossFn, client_lr: float, server_opt: optax.GradientTransformation | None = None,
    parallel: int | None = None, clip_norm: float = 0.0, client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """SCAFFOLD with control variates, option II.

    The local solver is plain SGD with learning rate `client_lr` (built here: option II needs the
    known lr): gradients are corrected by (c - c_i). After tau_i steps from x to y_i:
    c_i^+ = c_i - c + (x - y_i) / (tau_i * lr);  c <- c + (|S|/N) * mean_{i in S}(c_i^+ - c_i), N = K.
    The server applies `server_opt` (default optax.sgd(1.0), the paper's eta_g = 1) to -mean delta,
    weighted by the cohort weights (pass uniform weights for the paper's plain mean).
    State: c and N in ServerState.extras; c_i per client (zeros before a client first trains), the cohort's
    rows only (masked clients keep their c_i and do not move c).
    `client_schedule`: round -> factor s_r of `client_lr` (`schedules.lr_factor`; None: 1); the round's
    local lr, s_r * client_lr, is the lr of the c_i^+ formula.
    """
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt
    client_opt = optax.sgd(client_lr)
    if clip_norm > 0:  # clips the corrected gradient; c_i^+ then averages what was actually applied
        client_opt = optax.chain(optax.clip_by_global_norm(clip_norm), client_opt)

    def init_server(params, num_clients):
        extras = {"c": jax.tree.map(jnp.zeros_like, params), "num_clients": jnp.float32(num_clients)}
        return server_init(params, server_opt, extras=extras)

    def init_client(state, client_id):
        return jax.tree.map(jnp.zeros_like, state.params)

    def apply(state, c_i, cohort):
        c, n = state.extras["c"], state.extras["num_clients"]
        corr = jax.tree.map(lambda ci, cg: cg[None] - ci, c_i, c)
        scale = client_lr_scale(client_schedule, state)
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, loss_fn, corrections=corr,
                                           parallel=parallel, lr_scale=scale)
        inv = 1.0 / (jnp.maximum(taus, 1).astype(jnp.float32) * (client_lr * scale))
        c_new = jax.tree.map(lambda ci, cg, d: ci - cg[None] - d * per_client(inv, d).astype(d.dtype), c_i, c, deltas)
        dc = jax.tree.map(jnp.subtract, c_new, c_i)
        c_sum = weighted_sum(dc, jnp.full(cohort.mask.shape, 1.0 / n), cohort.mask)
        state = server_step(state, aggregate(deltas, cohort.weights, cohort.mask), server_opt)
        state = state.replace(extras={"c": jax.tree.map(jnp.add, c, c_sum), "num_clients": n})
        return state, c_new, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(init_server, apply, init_client)


register(AlgorithmSpec(
    "scaffold", "SCAFFOLD",
    lambda f, c: scaffold(c.loss_fn, f.client_lr, c.server_opt, c.parallel, f.clip_norm, c.client_schedule),
    messages=2, sgd_client_only=True))
