"""Knowledge messengers (after MH-pFLID, Xu et al. ICML 2024, "Multi-Head Personalized Federated Learning with
Injection-Distillation", and AFFL, arXiv 2510.06259): each client keeps a private model; a small shared messenger
travels between server and clients, and the two distil into each other on the client's data."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..aggregate import aggregate
from ..client import client_update
from ..schedules import Schedule
from .base import FederatedAlgorithm, client_lr_scale, map_clients, round_metrics, server_step, stateless_init
from .registry import AlgorithmSpec, register

Logits = Callable[[object, jax.Array], jax.Array]  # (params, tokens [B, T]) -> logits [B, T, V]


def mutual_distillation(private_logits: Logits, messenger_logits: Logits, alpha: float):
    """objective((private, messenger), batch): both models' next-token cross-entropy plus ``alpha`` times each one's
    KL divergence from the other's (fixed) prediction, per token (deep mutual learning, Zhang et al. 2018). Its
    gradient moves the private model by CE + alpha KL(messenger || private) and the messenger by
    CE + alpha KL(private || messenger). A batch is tokens [B, T+1] or (tokens, loss mask [B, T+1])."""

    def objective(pair, batch):
        private, messenger = pair
        tokens, mask = batch if isinstance(batch, tuple) else (batch, None)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        lp = jax.nn.log_softmax(private_logits(private, inputs).astype(jnp.float32))
        lm = jax.nn.log_softmax(messenger_logits(messenger, inputs).astype(jnp.float32))
        nll = lambda lq: -jnp.take_along_axis(lq, targets[..., None], -1)[..., 0]  # noqa: E731
        kl = lambda target, lq: jnp.sum(jnp.exp(target) * (target - lq), -1)  # noqa: E731
        sg = jax.lax.stop_gradient
        per_token = nll(lp) + nll(lm) + alpha * (kl(sg(lm), lp) + kl(sg(lp), lm))
        if mask is None:
            return per_token.mean()
        w = mask[:, 1:].astype(jnp.float32)
        return (per_token * w).sum() / jnp.maximum(w.sum(), 1.0)

    return objective


def messengers(
    private_logits: Logits, messenger_logits: Logits, init_private: Callable[[jax.Array], object],
    client_opt: optax.GradientTransformation, alpha: float = 1.0, seed: int = 0,
    server_opt: optax.GradientTransformation | None = None, parallel: int | None = None,
    client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """Knowledge messengers: the server state's params are the messenger; each client's state is its private model
    (``init_private(fold_in(PRNGKey(seed), client_id))`` before it first trains). Locally the pair takes the
    round's steps together on `mutual_distillation`'s objective; only the messenger's update is aggregated and sent.
    train_loss is that joint objective. The messenger's capacity may grow between rounds (`Plateau`,
    ``models.grow``); this round function serves one messenger size.
    """
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt
    objective = mutual_distillation(private_logits, messenger_logits, alpha)

    def apply(state, private, cohort):
        scale = client_lr_scale(client_schedule, state)

        def local(xs):
            p, batches, step_mask = xs
            (dp, dm), loss, tau = client_update((p, state.params), batches, step_mask, client_opt, objective,
                                                lr_scale=scale)
            return jax.tree.map(jnp.add, p, dp), dm, loss, tau

        private, deltas, losses, taus = map_clients(local, (private, cohort.batches, cohort.step_mask), parallel)
        state = server_step(state, aggregate(deltas, cohort.weights, cohort.mask), server_opt)
        return state, private, round_metrics(losses, taus, cohort)

    def init_client(state, client_id):
        return init_private(jax.random.fold_in(jax.random.PRNGKey(seed), client_id))

    return FederatedAlgorithm(stateless_init(server_opt), apply, init_client, personal=lambda state, p: p)


class Plateau(NamedTuple):
    """The growth rule: grow the messenger one ladder step when its held-out loss has not improved on its best by
    more than ``min_delta`` (relative) for ``patience`` evaluations in a row. Growth preserves the function
    (``models.grow``), so the best loss carries over."""

    best: float = float("inf")
    stale: int = 0

    def update(self, loss: float, patience: int, min_delta: float = 0.01) -> tuple["Plateau", bool]:
        """(the rule's next state, whether to grow now)."""
        if loss < self.best * (1 - min_delta):
            return Plateau(loss, 0), False
        stale = self.stale + 1
        return (Plateau(self.best, 0), True) if stale >= patience else (Plateau(self.best, stale), False)


register(AlgorithmSpec("messengers", "Messengers", lambda f, c: messengers(
    c.models.private_logits, c.models.messenger_logits, c.models.init_private, c.client_opt, f.distill_alpha,
    c.models.seed, c.server_opt, c.parallel, c.client_schedule), needs_models=True))
