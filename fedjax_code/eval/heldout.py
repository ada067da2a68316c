"""Held-out loss of the global model on every client's own held-out split, and fairness summaries."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def client_losses_fn(loss_fn: Callable) -> Callable:
    """jit: (params, windows [n, W, T+1]) -> mean loss per client [n]."""
    return jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))


def evaluate_clients(params, windows: np.ndarray, losses_fn: Callable, chunk: int) -> np.ndarray:
    """Per-client held-out loss [K] in fixed-size chunks of clients (one compile, bounded memory)."""
    k = len(windows)
    pad = -k % chunk
    padded = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)]) if pad else windows
    out = [np.asarray(losses_fn(params, jnp.asarray(padded[i : i + chunk]))) for i in range(0, len(padded), chunk)]
    return np.concatenate(out)[:k]


def fairness(losses: np.ndarray, heldout_tokens: np.ndarray) -> dict:
    """eval_loss (held-out tokens-weighted over clients), and the per-client mean, worst 10% and std."""
    worst = np.sort(losses)[::-1][: max(1, math.ceil(0.1 * len(losses)))]
    return {
        "eval_loss": float(np.average(losses, weights=np.maximum(heldout_tokens, 1))),
        "client_eval_loss_mean": float(losses.mean()),
        "client_eval_loss_worst10": float(worst.mean()),
        "client_eval_loss_std": float(losses.std()),
    }
