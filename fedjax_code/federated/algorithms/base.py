"""Shared pieces of a federated round: the algorithm interface, vmapped clients, server step, metrics.

Every algorithm takes ``parallel``: how many cohort clients train at once (None: all, one vmap;
see `map_clients`). It changes speed and memory, not results (up to float rounding).

A round is `apply(server_state, client_states, cohort) -> (server_state, client_states, metrics)`:
vmap(client_update) over the cohort -> masked weighted aggregate -> server optax update with the
negative mean delta as pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..aggregate import normalized_weights
from ..client import LossFn, client_update
from ..state import ClientStates, Cohort, PyTree, ServerState, gather, scatter


class FederatedAlgorithm(NamedTuple):
    """A federated algorithm as pure functions over the cohort (``round`` is jittable).

    init_server(params, num_clients) -> ServerState.
    round(server, rows, cohort) -> (server, rows, metrics): ``rows`` is the cohort's per-client state [C, ...]
      (None for stateless algorithms), returned updated; rows of masked clients are ignored by the caller.
    init_client(server, client_id) -> one client's state before it first trains (None: stateless). It is called
      inside the round, from the server state at the round's start, for clients with nothing stored yet.
    personal(server, row) -> the params a client would deploy (None: the global model, ``server.params``).

    Where per-client state lives is the caller's choice: a host-side ``ClientStore`` (training runs), or stacked
    [K, ...] on the device (``init`` and ``apply``, the reference the store is tested against).
    """

    init_server: Callable[..., ServerState]
    round: Callable[[ServerState, PyTree, Cohort], tuple[ServerState, PyTree, dict]]
    init_client: Callable[[ServerState, jax.Array], PyTree] | None = None
    personal: Callable[[ServerState, PyTree], PyTree] | None = None

    def init(self, params: PyTree, num_clients: int) -> tuple[ServerState, ClientStates | None]:
        """(ServerState, per-client state stacked on the device: (rows [K, ...], written [K]) or None)."""
        server = self.init_server(params, num_clients)
        if self.init_client is None:
            return server, None
        row = jax.eval_shape(self.init_client, server, jnp.int32(0))
        rows = jax.tree.map(lambda x: jnp.zeros((num_clients, *x.shape), x.dtype), row)
        return server, (rows, jnp.zeros(num_clients, bool))

    def apply(self, server: ServerState, states: ClientStates | None, cohort: Cohort):
        """``round`` on device-stacked per-client state: gather the cohort's rows, run, scatter them back."""
        if self.init_client is None:
            return self.round(server, None, cohort)
        rows, written = states
        cohort_rows = with_fresh(self, server, gather(rows, cohort.ids), ~written[cohort.ids], cohort.ids)
        server_new, cohort_rows, metrics = self.round(server, cohort_rows, cohort)
        written = scatter(written, cohort.ids, jnp.ones_like(cohort.mask), cohort.mask)
        return server_new, (scatter(rows, cohort.ids, cohort_rows, cohort.mask), written), metrics


def per_client(v: jax.Array, x: jax.Array) -> jax.Array:
    """Per-client values ``v`` [C] shaped to broadcast against a leaf ``x`` [C, ...]."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def with_fresh(algorithm: FederatedAlgorithm, server: ServerState, rows: PyTree, fresh: jax.Array, ids: jax.Array):
    """The cohort's rows, with ``init_client(server, id)`` in place of those never written (``fresh``)."""
    init = jax.vmap(algorithm.init_client, in_axes=(None, 0))(server, ids)
    pick = lambda a, b: jnp.where(per_client(fresh, a), a, b.astype(a.dtype))  # noqa: E731
    return jax.tree.map(pick, init, rows)


def jit_round(algorithm: FederatedAlgorithm, donate: bool = True):
    """jax.jit(algorithm.apply), donating the server and client states. Build it once and reuse it:
    shardings come from the inputs (see `federated.sharding`), so the same code runs on 1 or N devices.
    Donated inputs must not be used after the call."""
    return jax.jit(algorithm.apply, donate_argnums=(0, 1) if donate else ())


def server_init(params: PyTree, server_opt: optax.GradientTransformation, extras: PyTree = None) -> ServerState:
    return ServerState(params=params, opt_state=server_opt.init(params), round=jnp.zeros((), jnp.int32), extras=extras)


def stateless_init(server_opt: optax.GradientTransformation):
    """``init_server`` of an algorithm whose server state is the params and the server optimiser's state."""

    def init(params, num_clients=None):
        del num_clients
        return server_init(params, server_opt)

    return init


def map_clients(fn: Callable, xs: PyTree, parallel: int | None = None) -> PyTree:
    """``fn`` over the leading (client) axis of ``xs``: one vmap over all C clients, or, with
    ``parallel = V < C`` (V dividing C), a vmap over V groups each scanning its C / V clients in turn.

    Client i is in group i // (C / V), so a cohort sharded in contiguous blocks over D devices stays
    sharded when V is a multiple of D. Fewer clients in flight trade parallelism for smaller working
    sets: on CPU, per-client batches of a few hundred tokens already fill the cores.
    """
    c = jax.tree.leaves(xs)[0].shape[0]
    if parallel is None or parallel >= c:
        return jax.vmap(fn)(xs)
    if c % parallel:
        raise ValueError(f"clients in parallel ({parallel}) must divide the cohort size ({c})")
    if parallel == 1:
        return jax.lax.map(fn, xs)
    groups = jax.tree.map(lambda x: x.reshape(parallel, c // parallel, *x.shape[1:]), xs)
    ys = jax.vmap(lambda g: jax.lax.map(fn, g))(groups)
    return jax.tree.map(lambda y: y.reshape(c, *y.shape[2:]), ys)


def run_clients(
    params: PyTree,
    cohort: Cohort,
    client_opt: optax.GradientTransformation,
    loss_fn: LossFn,
    corrections: PyTree | None = None,
    penalty: Callable[[PyTree], jax.Array] | None = None,
    parallel: int | None = None,
    lr_scale: jax.Array | float = 1.0,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """client_update for every cohort member from the shared `params`, vectorised by `map_clients`:
    (deltas [C,...], losses [C], taus [C]). `corrections`, if given, is per client [C, ...];
    `lr_scale` (this round's client learning-rate factor, see `client_lr_scale`) is shared."""

    def one(xs):
        batches, step_mask, corr = xs
        return client_update(params, batches, step_mask, client_opt, loss_fn, corr, penalty, lr_scale)

    return map_clients(one, (cohort.batches, cohort.step_mask, corrections), parallel)


def client_lr_scale(client_schedule: Callable | None, state: ServerState) -> jax.Array | float:
    """This round's client learning-rate factor, ``client_schedule(state.round)`` (traced: the round is
    compiled once); 1 without a schedule. See `schedules.lr_factor`."""
    return 1.0 if client_schedule is None else client_schedule(state.round)


def server_optimizer(
    name: str = "sgd", lr: optax.ScalarOrSchedule = 1.0, momentum: float = 0.0, b1: float = 0.9, b2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
    """Server optimiser applied to the pseudo-gradient -mean_delta.

    ``lr`` may be an optax schedule of the optimiser's count, which advances once per round
    (`schedules.server_learning_rate`).

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


def server_step(state: ServerState, mean_delta: PyTree, server_opt: optax.GradientTransformation) -> ServerState:
    """Apply the server optimizer to the pseudo-gradient -mean_delta and advance the round counter."""
    pseudo_grad = jax.tree.map(jnp.negative, mean_delta)
    updates, opt_state = server_opt.update(pseudo_grad, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, round=state.round + 1)


def cohort_mean(values: jax.Array, cohort: Cohort) -> jax.Array:
    """The participants' weighted mean of per-client ``values`` [C]."""
    p = normalized_weights(cohort.weights, cohort.mask)
    return jnp.sum(jnp.where(cohort.mask.astype(bool), p * values, 0.0))


def round_metrics(losses: jax.Array, taus: jax.Array, cohort: Cohort) -> dict:
    """train_loss (weighted mean over participants), participants (count), mean_tau (over participants)."""
    mask = cohort.mask.astype(bool)
    n = mask.sum(dtype=jnp.int32)
    return {
        "train_loss": cohort_mean(losses, cohort),
        "participants": n,
        "mean_tau": jnp.where(mask, taus, 0).sum() / jnp.maximum(n, 1).astype(jnp.float32),
    }
