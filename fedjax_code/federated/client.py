"""Local training on one client: a `lax.scan` over E local steps with padded steps masked out."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from .state import PyTree

LossFn = Callable[[PyTree, PyTree], jax.Array]


def client_optimizer(name: str, lr: float, weight_decay: float = 0.0, clip_norm: float = 0.0
                     ) -> optax.GradientTransformation:
    """The local solver: 'sgd' (plain SGD, optional L2-style decoupled decay) or 'adamw'.

    ``clip_norm > 0`` first clips each step's gradient to that global norm (Pascanu et al. 2013).
    """
    name = name.lower()
    if name == "sgd":
        sgd = optax.sgd(lr)
        solver = optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd
    elif name == "adamw":
        solver = optax.adamw(lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown client optimizer {name!r}; expected 'sgd' or 'adamw'")
    return optax.chain(optax.clip_by_global_norm(clip_norm), solver) if clip_norm > 0 else solver


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def client_update(
    params: PyTree,
    batches: PyTree,
    step_mask: jax.Array,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    grad_correction: PyTree | None = None,
    penalty: Callable[[PyTree], jax.Array] | None = None,
    lr_scale: jax.Array | float = 1.0,
    prox: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """Run up to E local steps from `params` and return (delta, mean loss, tau).

    batches: pytree of leaves [E, ...]; step_mask [E] bool. A step whose mask is False leaves both
    the params and the optimizer state unchanged (selected with `jnp.where`), so clients with
    different numbers of local steps tau_i <= E share one compiled program.
    grad_correction: a params-shaped pytree added to every gradient (SCAFFOLD's c - c_i).
    penalty: params -> scalar added to the objective for the gradient but not to the reported loss
    (FedProx's proximal term).
    lr_scale: a (traced) scalar multiplying every optimizer update: this round's learning-rate factor
    (`schedules.lr_factor`), since the optimizer, re-initialised each round, cannot count rounds.
    prox: params -> params applied after every step (a proximal step, e.g. Ditto's pull to the global model).
    Returns delta = final - start params, the mean `loss_fn` over active steps (0 if none), and
    tau = number of active steps (int32).
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def step(carry, inp):
        p, s = carry
        batch, active = inp
        loss, g = grad_fn(p, batch)
        if penalty is not None:
            g = jax.tree.map(jnp.add, g, jax.grad(penalty)(p))
        if grad_correction is not None:
            g = jax.tree.map(lambda a, c: a + c.astype(a.dtype), g, grad_correction)
        updates, s_new = optimizer.update(g, s, p)
        updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
        p_new = optax.apply_updates(p, updates)
        if prox is not None:
            p_new = prox(p_new)
        return (_select(active, p_new, p), _select(active, s_new, s)), jnp.where(active, loss, 0.0)

    step_mask = step_mask.astype(bool)
    (final, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), (batches, step_mask))
    tau = step_mask.sum(dtype=jnp.int32)
    mean_loss = losses.sum() / jnp.maximum(tau, 1)
    delta = jax.tree.map(jnp.subtract, final, params)
    return delta, mean_loss, tau
