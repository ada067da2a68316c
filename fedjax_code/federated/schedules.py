"""Learning-rate schedules across rounds: jittable functions of the (0-based) round.

``lr_factor`` is the multiplier of a base learning rate at round r of ``rounds``:

- ``constant``: 1 every round (warm-up and final ratio ignored: today's behaviour);
- ``cosine``: with n = r + 1 and W = max(warmup_rounds, 1), a linear warm-up n / W up to round W - 1
  (factor 1), then cosine decay to ``final_lr_ratio`` at round ``rounds - 1`` (Loshchilov & Hutter 2017,
  "SGDR"; optax.warmup_cosine_decay_schedule);
- ``inverse-sqrt``: the same warm-up, then sqrt(W / n) (Vaswani et al. 2017, "Attention Is All You Need").

The server applies ``server_learning_rate`` as its optax learning rate (its count advances once per
round); clients, whose optimiser restarts every round, scale their updates by ``lr_factor(round)``.
"""

from typing import Callable

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "inverse-sqrt")

Schedule = Callable[[object], object]  # round (int or traced int32) -> factor or learning rate


def lr_factor(name: str, rounds: int, warmup_rounds: int = 0, final_lr_ratio: float = 0.1) -> Schedule:
    """round -> multiplier of the base learning rate (see the module docstring)."""
    if name == "constant":
        return lambda r: 1.0
    w = max(warmup_rounds, 1)
    if name == "cosine":
        warm_cosine = optax.warmup_cosine_decay_schedule(0.0, 1.0, w, max(rounds, w + 1), final_lr_ratio)
        return lambda r: warm_cosine(r + 1)
    if name == "inverse-sqrt":
        return lambda r: jnp.minimum((r + 1) / w, jnp.sqrt(w / (r + 1)))
    raise ValueError(f"unknown learning-rate schedule {name!r}; expected one of {', '.join(SCHEDULES)}")


def server_learning_rate(name: str, lr: float, rounds: int, warmup_rounds: int = 0,
                         final_lr_ratio: float = 0.1) -> float | Schedule:
    """The server optimiser's optax learning rate: ``lr`` itself when constant (the optimiser state keeps
    its shape), else count -> lr * lr_factor(count)."""
    if name == "constant":
        return lr
    factor = lr_factor(name, rounds, warmup_rounds, final_lr_ratio)
    return lambda count: lr * factor(count)

