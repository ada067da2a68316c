"""Per-client state at K = 100, 1,000 and 10,000 clients with a fixed cohort: the host-side ClientStore (what
training runs use) against the same state stacked [K, ...] on the device. JSON lines, then a table.

Ditto on the cpu-1 decoder (0.86M params, a 3.4 MB personal model per client), FedAvg global update, local SGD;
each round half the cohort repeats clients of the round before (their rows are read back) and half is drawn
uniformly from the K clients; random tokens. Every (K, mode) runs in a fresh child process,
so its memory figures are its own:
  device_mb       XLA's buffers for the jitted round (arguments, outputs, temporaries, less donated aliases):
                  what the round holds on an accelerator. With the store it holds the cohort's C rows; stacked,
                  all K rows.
  rss_mb, peak_rss_mb   the process's resident memory after the rounds, and its peak (host memory; on this CPU
                  the device buffers are host memory too)
  disk_mb         blocks the store's files occupy (sparse: only clients that trained take space)
  round_s         median wall time of a round (gather, round, scatter), and of its gather_s and scatter_s
Stacked state needing more than --max-stacked-gb is not attempted; its row says how much it would need.

    .venv/bin/python benchmarks/client_state.py                                  # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/client_state.py --clients 100,1000 --rounds 3 --json-out c.json
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_code import federated as fl
from fedjax_code.models import get_preset, init_params, loss_fn

FIELDS = ("clients", "mode", "cohort", "row_mb", "device_mb", "rss_mb", "peak_rss_mb", "disk_mb", "round_s",
          "gather_s", "scatter_s", "skipped")


def proc_mb(field: str) -> float:
    """VmRSS or VmHWM of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def compiled_mb(fn, *args) -> float:
    m = fn.lower(*args).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 1e6


def setup(args):
    cfg = dataclasses.replace(get_preset(args.scale), vocab_size=args.vocab)
    params = init_params(cfg, jax.random.PRNGKey(0))
    alg = fl.ditto(lambda p, b: loss_fn(p, cfg, b), fl.client_optimizer("sgd", 0.1), lam=0.1, client_lr=0.1)
    return cfg, params, alg


def cohort(args, k: int, round_: int) -> fl.Cohort:
    """Round ``round_``'s cohort: half of it repeats clients of the previous round (whose rows the store must then
    read back), half is drawn anew; random tokens."""
    rng = np.random.default_rng(round_)
    ids = rng.choice(k, args.cohort, replace=False).astype(np.int32)
    if round_:
        again = np.random.default_rng(round_ - 1).choice(k, args.cohort, replace=False)[: args.cohort // 2]
        ids = np.concatenate([again, [i for i in ids if i not in again][: args.cohort - len(again)]]).astype(np.int32)
    tokens = rng.integers(0, args.vocab, (args.cohort, args.local_steps, args.batch, args.seq_len + 1), np.int32)
    c = args.cohort
    return fl.Cohort(jnp.asarray(ids), jnp.ones(c, bool), jnp.ones(c), jnp.asarray(tokens),
                     jnp.ones((c, args.local_steps), bool))


def child(args, k: int, mode: str) -> dict:
    cfg, params, alg = setup(args)
    server = alg.init_server(params, k)
    row = jax.eval_shape(alg.init_client, server, jnp.int32(0))
    row_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(row))
    out = {"clients": k, "mode": mode, "cohort": args.cohort, "row_mb": round(row_bytes / 1e6, 2)}
    if mode == "stacked" and k * row_bytes > args.max_stacked_gb * 1e9:
        return {**out, "skipped": f"needs {k * row_bytes / 1e9:.1f} GB of device memory for the stacked rows"}
    times, gathers, scatters = [], [], []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if mode == "store":
            store = fl.ClientStore(Path(tmp), row, k)

            def round_(server, rows, fresh, c):
                return alg.round(server, fl.with_fresh(alg, server, rows, fresh, c.ids), c)

            round_fn = jax.jit(round_, donate_argnums=(0, 1))
            rows, fresh = store.gather(np.zeros(args.cohort, np.int32))
            out["device_mb"] = compiled_mb(round_fn, server, rows, fresh, cohort(args, k, 0))
        else:
            server, states = alg.init(params, k)
            round_fn = fl.jit_round(alg)
            out["device_mb"] = compiled_mb(round_fn, server, states, cohort(args, k, 0))
        for r in range(args.rounds + 1):  # round 0 compiles
            c = cohort(args, k, r)
            t0 = time.perf_counter()
            if mode == "store":
                rows, fresh = store.gather(np.asarray(c.ids))
                t1 = time.perf_counter()
                server, rows, _ = round_fn(server, rows, fresh, c)
                rows = jax.device_get(rows)
                t2 = time.perf_counter()
                store.scatter(r + 1, np.asarray(c.ids), rows, np.asarray(c.mask))
                store.commit(r + 1)
                gathers.append(t1 - t0)
                scatters.append(time.perf_counter() - t2)
            else:
                server, states, _ = round_fn(server, states, c)
                jax.block_until_ready(states)
            times.append(time.perf_counter() - t0)
        if mode == "store":
            blocks = sum(os.stat(p).st_blocks * 512 for p in Path(tmp).glob("*.bin"))
            out.update(disk_mb=round(blocks / 1e6, 1), gather_s=statistics.median(gathers[1:]),
                       scatter_s=statistics.median(scatters[1:]))
    return {**out, "device_mb": round(out["device_mb"], 1), "round_s": round(statistics.median(times[1:]), 4),
            "rss_mb": round(proc_mb("VmRSS"), 1), "peak_rss_mb": round(proc_mb("VmHWM"), 1)}


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for row in rows:
        cells = [row.get(f, "") for f in FIELDS]
        lines.append("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="100,1000,10000")
    p.add_argument("--cohort", type=int, default=8)
    p.add_argument("--scale", default="cpu-1")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--max-stacked-gb", type=float, default=8.0)
    p.add_argument("--tmp", default=None, help="where the stores are written (default: the system's temp dir)")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--child", nargs=2, metavar=("K", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args, int(args.child[0]), args.child[1])))
        return
    rows = []
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("clients", "json_out", "child") and v is not None]
    for k in (int(x) for x in args.clients.split(",")):
        for mode in ("store", "stacked"):
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", str(k), mode],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"K={k} {mode} failed: {proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
