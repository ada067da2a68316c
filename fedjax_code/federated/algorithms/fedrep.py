"""FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated Learning"): a shared
body, aggregated, and a head per client, never sent."""

import re

import jax
import jax.numpy as jnp
import optax

from ..aggregate import aggregate
from ..client import LossFn, client_update
from ..schedules import Schedule
from ..state import PyTree
from .base import FederatedAlgorithm, client_lr_scale, map_clients, round_metrics, server_step, stateless_init
from .registry import AlgorithmSpec, register


def param_paths(tree: PyTree) -> list[str]:
    """Each leaf's path as "layers_3/mlp/up_proj/kernel", in leaf order."""
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def head_paths(tree: PyTree, head: str) -> frozenset[str]:
    """The leaves ``head`` names: "last" (the last decoder block, the final norm and an untied LM head), "none",
    or a regular expression searched in each leaf's path."""
    paths = param_paths(tree)
    if head == "none":
        return frozenset()
    if head == "last":
        blocks = [int(m.group(1)) for p in paths if (m := re.match(r"layers_(\d+)/", p))]
        last = f"layers_{max(blocks)}/" if blocks else None
        return frozenset(p for p in paths if (last and p.startswith(last)) or p.split("/")[0] in ("norm", "lm_head"))
    return frozenset(p for p in paths if re.search(head, p))


def split(tree: PyTree, head: frozenset[str]) -> tuple[dict, dict]:
    """(head, body): flat dicts path -> leaf."""
    leaves = dict(zip(param_paths(tree), jax.tree.leaves(tree)))
    return ({p: x for p, x in leaves.items() if p in head}, {p: x for p, x in leaves.items() if p not in head})


def join(like: PyTree, head: dict, body: dict) -> PyTree:
    """The tree shaped like ``like`` from its ``head`` and ``body`` parts."""
    return jax.tree.unflatten(jax.tree.structure(like), [head.get(p, body.get(p)) for p in param_paths(like)])


def fedrep(
    loss_fn: LossFn, client_opt: optax.GradientTransformation, head: str = "last",
    server_opt: optax.GradientTransformation | None = None, parallel: int | None = None,
    client_schedule: Schedule | None = None,
) -> FederatedAlgorithm:
    """FedRep: each cohort client first trains its head for the round's local steps with the body frozen, then the
    body for as many steps with its new head frozen (the paper's alternating update, one pass each over the same
    batches). Only the body's update is aggregated and sent; the head stays with the client. A client's head
    starts as the global model's (the initial head: the server never changes it). ``head`` as in `head_paths`;
    an empty head makes FedRep FedAvg.
    """
    server_opt = optax.sgd(1.0) if server_opt is None else server_opt

    def apply(state, heads, cohort):
        scale = client_lr_scale(client_schedule, state)
        server_head, body = split(state.params, head_paths(state.params, head))

        def local(xs):
            h, batches, step_mask = xs
            head_loss = lambda hh, b: loss_fn(join(state.params, hh, body), b)  # noqa: E731
            dh, _, _ = client_update(h, batches, step_mask, client_opt, head_loss, lr_scale=scale)
            h = jax.tree.map(jnp.add, h, dh)
            body_loss = lambda bb, b: loss_fn(join(state.params, h, bb), b)  # noqa: E731
            db, loss, tau = client_update(body, batches, step_mask, client_opt, body_loss, lr_scale=scale)
            return h, db, loss, tau

        heads, body_deltas, losses, taus = map_clients(local, (heads, cohort.batches, cohort.step_mask), parallel)
        no_head = jax.tree.map(jnp.zeros_like, server_head)
        delta = join(state.params, no_head, aggregate(body_deltas, cohort.weights, cohort.mask))
        return server_step(state, delta, server_opt), heads, round_metrics(losses, taus, cohort)

    return FederatedAlgorithm(
        stateless_init(server_opt), apply,
        init_client=lambda state, client_id: split(state.params, head_paths(state.params, head))[0],
        personal=lambda state, h: join(state.params, h, split(state.params, head_paths(state.params, head))[1]))


register(AlgorithmSpec("fedrep", "FedRep", lambda f, c:
                       fedrep(c.loss_fn, c.client_opt, f.fedrep_head, c.server_opt, c.parallel, c.client_schedule),
                       sent=lambda f, params: split(params, head_paths(params, f.fedrep_head))[1]))
