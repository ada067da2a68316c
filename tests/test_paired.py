"""Paired differences between sweep cells on the same HumanEval problems, their seed spread, and when the answer
may name a best scale: only where the paired CI excludes 0 and the difference exceeds the seed spread."""

import csv
import json

import numpy as np
import pytest

from fedjax_code.experiments import fits
from fedjax_code.experiments.report import write_report
from tests.test_report import make_sweep

TASKS = [f"HumanEval/{i}" for i in range(40)]


def _passes(solved: int) -> dict:
    """The first ``solved`` problems pass 3 of 10 samples (pass@10 = 1), the others none."""
    return {t: 3 if i < solved else 0 for i, t in enumerate(TASKS)}


def _report(tmp_path, solved_by_scale_seed: dict) -> tuple[dict, dict, list[dict]]:
    """(answer.json, its one group, results.csv rows) of a sweep whose cells solve ``{(scale, seed): n}``."""
    cells = [({"scale": scale, "seed": seed}, {"params": int(1e6 * scale), "passes": _passes(solved)})
             for (scale, seed), solved in solved_by_scale_seed.items()]
    write_report(make_sweep(tmp_path, cells))
    answer = json.loads((tmp_path / "answer.json").read_text())
    with open(tmp_path / "results.csv") as f:
        return answer, answer["groups"][0], list(csv.DictReader(f))


def test_paired_ci_is_tight_where_independent_cis_overlap():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.0, 0.9, 60)  # problems differ far more than the cells do
    a, b = difficulty + 0.05 + rng.normal(0, 0.005, 60), difficulty
    got = fits.paired_difference(a, b, resamples=1000)
    assert got["diff"] == pytest.approx(np.mean(a - b)) and got["diff"] == pytest.approx(0.05, abs=0.005)
    assert 0 < got["ci"][0] < got["diff"] < got["ci"][1] and got["ci"][1] - got["ci"][0] < 0.01
    ci_a, ci_b = fits.mean_ci(a), fits.mean_ci(b)
    assert ci_a[0] < ci_b[1]  # each cell's own CI over problems overlaps the other's: they cannot tell a from b
    assert got == fits.paired_difference(a, b, resamples=1000)  # a fixed seed: reproducible
    assert got["seeds"] == 1 and got["seed_spread"] is None  # one seed: the spread is unknown


def test_seeds_are_averaged_per_problem_and_their_spread_is_the_per_seed_difference():
    difficulty = np.linspace(0.0, 0.8, 30)
    a = np.stack([difficulty + 0.05, difficulty + 0.07])  # [seeds, problems]
    b = np.stack([difficulty, difficulty])
    got = fits.paired_difference(a, b)
    assert got["diff"] == pytest.approx(0.06) and got["ci"] == pytest.approx([0.06, 0.06])
    assert got["seeds"] == 2 and got["seed_spread"] == pytest.approx(np.std([0.05, 0.07], ddof=1))
    assert fits.seed_spread([0.3, np.nan]) is None and fits.seed_spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    values = np.stack([a, b])  # [scales, seeds, problems]
    assert fits.paired_vs_best(values, [1.0, 2.0], 1.0)[2.0]["distinct"]  # 0.06 > its spread 0.014
    assert not fits.paired_vs_best(values[:, :1], [1.0, 2.0], 1.0)[2.0]["distinct"]  # one seed: never
    nll = fits.paired_vs_best(-values, [1.0, 2.0], 1.0, higher_is_better=False)[2.0]  # lower is better
    assert nll["diff"] == pytest.approx(-0.06) and nll["distinct"]


def test_identical_cells_name_no_best(tmp_path):
    answer, group, rows = _report(tmp_path, {(s, seed): 10 for s in (1.0, 2.0, 4.0) for seed in (0, 1)})
    assert not group["distinct"] and all(p["ci"][0] <= 0 <= p["ci"][1] for p in group["paired"].values())
    assert ("on iid data (heterogeneity 0.300) no scaling factor is distinguishable from the others: 1 is highest but "
            "not distinguishable (paired difference +0 against 2, 95% CI +0 to +0; seed spread 0 over 2 seeds)"
            ) in answer["answer"]
    assert "the best scaling factor" not in answer["answer"]
    assert {r["paired_distinct"] for r in rows} == {"", "False"} and {r["paired_best"] for r in rows} == {"1.0"}


def test_one_seed_never_names_a_best_however_large_the_difference(tmp_path):
    answer, group, rows = _report(tmp_path, {(1.0, 0): 0, (2.0, 0): 40, (4.0, 0): 1})
    p = group["paired"]["4.0"]
    assert p["diff"] == pytest.approx(39 / 40) and p["ci"][0] > 0.9  # the problems leave no doubt...
    assert p["seed_spread"] is None and not p["distinct"] and not group["distinct"]  # ...the seeds are unknown
    assert ("no scaling factor is distinguishable from the others: 2 is highest but not distinguishable (paired "
            "difference +0.975 against 4, 95% CI +0.9") in answer["answer"]
    assert answer["answer"].endswith("to +1; single seed: seed spread unknown, so a second seed is needed to name a "
                                     "best).")
    md = (tmp_path / "report.md").read_text()
    assert "## Paired differences" in md and "| iid, 25% | 4 | 0.025 | pass@10 | 2 | 0.975 |" in md


def test_two_seeds_with_a_clear_consistent_difference_name_the_best(tmp_path):
    answer, group, rows = _report(tmp_path, {(1.0, 0): 2, (1.0, 1): 3, (2.0, 0): 20, (2.0, 1): 22,
                                            (4.0, 0): 8, (4.0, 1): 8})
    p = group["paired"]["4.0"]  # the runner-up: 2 solves 21 problems on average, 4 solves 8
    assert p["diff"] == pytest.approx(13 / 40) and p["ci"][0] > 0
    assert p["seed_spread"] == pytest.approx(np.std([12 / 40, 14 / 40], ddof=1)) and p["distinct"]
    assert group["distinct"] and group["optimal"] == 2.0
    assert group["seed_spread"]["2.0"] == pytest.approx(np.std([0.5, 0.55], ddof=1))
    assert ("ranked by HumanEval pass@10: on iid data (heterogeneity 0.300) the best scaling factor is 2 (paired "
            "difference +0.325 against 4, 95% CI ") in answer["answer"]
    assert "seed spread 0.0354 over 2 seeds)" in answer["answer"]
    by_scale = {r["scale"]: r for r in rows}
    assert float(by_scale["4.0"]["paired_diff_vs_best"]) == pytest.approx(0.325)
    assert float(by_scale["4.0"]["paired_ci_low"]) > 0 and by_scale["4.0"]["paired_distinct"] == "True"
    assert float(by_scale["4.0"]["paired_diff_seed_spread"]) == pytest.approx(0.0354, abs=1e-4)
    assert by_scale["2.0"]["paired_diff_vs_best"] == "" and by_scale["2.0"]["paired_metric"] == "pass@10"


def test_a_difference_inside_the_seed_spread_names_no_best(tmp_path):
    """The CI over problems excludes 0, but one seed shows the gap and the other does not."""
    answer, group, _ = _report(tmp_path, {(1.0, 0): 8, (1.0, 1): 8, (2.0, 0): 16, (2.0, 1): 8})
    p = group["paired"]["1.0"]
    assert p["diff"] == pytest.approx(0.1) and p["ci"][0] > 0 and p["seed_spread"] == pytest.approx(0.2 / np.sqrt(2))
    assert not p["distinct"] and not group["distinct"]
    assert "2 is highest but not distinguishable (paired difference +0.1 against 1" in answer["answer"]


def test_the_nll_fallback_needs_the_same_evidence(tmp_path):
    base = np.linspace(0.5, 2.5, len(TASKS))  # problems differ in difficulty
    for seeds, named in (((0,), False), ((0, 1), True)):
        cells = [({"scale": s, "seed": seed}, {"params": int(1e6 * s), "passes": _passes(0),
                                               "nll": {t: v + shift + 0.002 * seed * s for t, v in zip(TASKS, base)}})
                 for s, shift in ((1.0, 0.0), (2.0, -0.05)) for seed in seeds]
        root = tmp_path / str(len(seeds))
        out = write_report(make_sweep(root, cells))
        group = json.loads((root / "answer.json").read_text())["groups"][0]
        assert group["metric"] == "humaneval_nll" and group["optimal"] == 2.0 and group["distinct"] is named
        assert group["paired"]["1.0"]["diff"] == pytest.approx(-0.05 + 0.001 * (len(seeds) - 1))
        verdict = ("the best scaling factor is 2" if named else
                   "no scaling factor is distinguishable from the others: 2 is lowest but not distinguishable")
        assert f"ranked by HumanEval NLL (lower is better) instead: on iid data (heterogeneity 0.300) {verdict}" \
            in out["answer"]
