"""pFedMe (Dinh et al. 2020, "Personalized Federated Learning with Moreau Envelopes"): clients minimise the Moreau
envelope of their loss; the personal model is the envelope's inner solution."""

import jax
import jax.numpy as jnp
import optax

from ..aggregate import aggregate
from ..client import LossFn
from ..schedules import Schedule
from .base import (FederatedAlgorithm, client_lr_scale, map_clients, per_client, round_metrics, run_clients,
                   server_step, stateless_init)
from .registry import AlgorithmSpec, register


def moreau(loss_fn: LossFn, lam: float, inner_steps: int, inner_lr: float):
    """(personal, envelope): personal(w, batch) approximates theta(w) = argmin_theta f(theta) + lam/2 ||theta - w||^2
    by ``inner_steps`` gradient steps from theta = w; envelope(w, batch) = f(theta) + lam/2 ||theta - w||^2 with
    theta held fixed, whose gradient in w is the envelope's, lam (w - theta(w))."""

    def personal(w, batch):
        def step(theta, _):
            g = jax.grad(loss_fn)(theta, batch)
            return jax.tree.map(lambda t, gi, wi: t - inner_lr * (gi + lam * (t - wi)), theta, g, w), None

        return jax.lax.scan(step, w, None, length=inner_steps)[0]

    def envelope(w, batch):
        theta = jax.lax.stop_gradient(personal(jax.lax.stop_gradient(w), batch))
        gap = sum(jnp.sum(jnp.square(t - x)) for t, x in zip(jax.tree.leaves(theta), jax.tree.leaves(w)))
        return loss_fn(theta, batch) + 0.5 * lam * gap

    return personal, envelope


def pfedme(
    loss_fn: LossFn, client_opt: optax.GradientTransformation, lam: float = 15.0, inner_steps: int = 5,
    inner_lr: float = 0.01, beta: float = 1.0, server_opt: optax.GradientTransformation | None = None,
    parallel: int | None = None, client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """pFedMe: each local step solves for the personal model theta on its batch (`moreau`) and moves the local
    model w along the envelope's gradient lam (w - theta) with the client optimiser (SGD in the paper). The server
    steps ``beta`` of the way to the clients' weighted mean, w <- (1 - beta) w + beta mean(w_i). train_loss is the
    envelope's value. A client keeps the personal model of its last local step (for evaluation; it is not sent);
    before it trains, its personal model is the global model.
    """
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt
    personal, envelope = moreau(loss_fn, lam, inner_steps, inner_lr)

    def apply(state, thetas, cohort):
        deltas, losses, taus = run_clients(state.params, cohort, client_opt, envelope, parallel=parallel,
                                           lr_scale=client_lr_scale(client_schedule, state))

        def last_personal(xs):  # theta of the final local model on the client's last active batch
            delta, batches, tau = xs
            batch = jax.tree.map(lambda x: x[jnp.maximum(tau, 1) - 1], batches)
            return personal(jax.tree.map(jnp.add, state.params, delta), batch)

        new = map_clients(last_personal, (deltas, cohort.batches, taus), parallel)
        thetas = jax.tree.map(lambda n, t: jnp.where(per_client(taus > 0, n), n, t), new, thetas)
        step = jax.tree.map(lambda d: (beta * d).astype(d.dtype), aggregate(deltas, cohort.weights, cohort.mask))
        return server_step(state, step, server_opt), thetas, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(stateless_init(server_opt), apply, init_client=lambda state, client_id: state.params,
                              personal=lambda state, theta: theta)


register(AlgorithmSpec("pfedme", "pFedMe", lambda f, c: pfedme(
    c.loss_fn, c.client_opt, f.pfedme_lambda, f.pfedme_inner_steps, f.pfedme_lr, f.pfedme_beta, c.server_opt,
    c.parallel, c.client_schedule)))
