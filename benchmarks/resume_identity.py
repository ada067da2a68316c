"""A training run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one: JSON, then a table.

Trains the same config twice into --out: ``uninterrupted/`` in one go, and ``killed/`` in a child process that is
sent SIGKILL as soon as checkpoint --kill-after exists, then resumed here. It compares the metrics.jsonl records
(timings left out) and every leaf of the final trainable parameters (the adapters of a LoRA run), bit for bit.
The tests do this on tiny models; this script does it on a real configuration, such as a cpu-pretrained cell.

    .venv/bin/python benchmarks/resume_identity.py --config runs/cpu-pretrained/cells/iid_p0.25_fedavg_k8_r16_seed0/run/config.json \
        --out runs/resume-smollm2 federated.rounds=4 train.eval_every=2     # SmolLM2 LoRA r16, ~8 minutes on 2 cores
"""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fedjax_code.config import apply_overrides, experiment_from_dict
from fedjax_code.experiments.run import train
from fedjax_code.rundir import load_trained

TIMING = ("wall_s", "tokens_per_s", "includes_compile")


def config(path: str, overrides: list[str]):
    """A run's config.json (its "config" object) with ``overrides`` applied, checkpointing every round."""
    d = json.loads(Path(path).read_text())["config"]
    return experiment_from_dict(apply_overrides(d, [*overrides, "train.checkpoint_every=1"]))


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def kill_after(args, out: Path) -> float:
    """Train in a child process and SIGKILL it once checkpoint ``args.kill_after`` is written; seconds it ran."""
    child = [sys.executable, __file__, "--child", "--config", args.config, "--out", str(out), *args.overrides]
    start = time.time()
    proc = subprocess.Popen(child, stderr=subprocess.PIPE)
    while not (out / "checkpoints" / str(args.kill_after)).is_dir() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if (out / "summary.json").exists() or proc.returncode != -signal.SIGKILL:
        sys.exit(f"the child was not killed mid-run (exit {proc.returncode}): {err.decode()[-500:]}")
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a run's config.json")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kill-after", type=int, default=2, help="the checkpoint (round) after which to kill")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    cfg = config(args.config, args.overrides)
    if args.child:
        train(cfg, args.out, progress=False)
        return
    t0 = time.time()
    train(cfg, args.out / "uninterrupted", force=True, progress=False)
    t1 = time.time()
    killed_s = kill_after(args, args.out / "killed")
    t2 = time.time()
    train(cfg, args.out / "killed", resume=True, progress=False)
    resumed_s = time.time() - t2
    a, b = (load_trained(args.out / name).trainable for name in ("uninterrupted", "killed"))
    leaves = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    result = {
        "rounds": cfg.federated.rounds, "killed_after_checkpoint": args.kill_after,
        "uninterrupted_s": round(t1 - t0, 1), "killed_s": round(killed_s, 1), "resumed_s": round(resumed_s, 1),
        "metrics_equal": records(args.out / "uninterrupted") == records(args.out / "killed"),
        "leaves": len(leaves), "leaves_bit_identical": sum(np.array_equal(x, y) for x, y in leaves),
        "max_abs_diff": max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves),
    }
    print(json.dumps(result))
    for key, value in result.items():
        print(f"{key:26s} {value}")
    sys.exit(0 if result["metrics_equal"] and result["leaves_bit_identical"] == len(leaves) else 1)


if __name__ == "__main__":
    main()
