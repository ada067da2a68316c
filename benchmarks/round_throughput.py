"""Throughput of one jitted federated round (FedAvg, client SGD): JSON lines, then a table.

For every (scale, cohort C, per-client batch B) it builds a random-token Cohort [C, E, B, T+1], compiles
the jitted ``fedavg(...).apply`` (state donated, the frozen base an argument as in training) with one
warm-up call, then times ``--rounds`` rounds (each fed the previous round's output state, since the round
donates its inputs) and reports the median wall time.

Each configuration runs three ways on the same data: the engine's round (``fedavg(..., parallel=P)``, with
P = ``parallel_clients`` of the config: how many clients train at once), the same round with all C clients
in one vmap, and a FedJAX-style loop. The three alternate, so background load hits them alike.

Metrics (one JSON object per configuration on stdout, flushed as it goes; comments go to stderr):
  clients_in_parallel  P (C: one vmap; fewer: a vmap over P groups, each scanning its clients)
  engine_s, round_s    median wall time of the engine's round and of the one-vmap round
  tokens_per_s         training tokens C*E*B*T / engine_s
  client_updates_per_s C / engine_s
  mfu                  model FLOP/s of the engine's round / peak FLOP/s. Model FLOPs = flops_per_token(cfg, T)
                       * tokens (PaLM's 6N + 12 L T d, forward+backward, lm head counted). Peak: the best
                       float32 2048^3 matmul (2 n^3 FLOPs) timed in this process before the sweep (JSON lines)
                       and again after it; the table and --json-out use the higher of the two
  lora_rank, trainable_bytes, base_bytes   with --pretrained --lora-rank r: what is trained and sent per client,
                       and the frozen base that every client shares (an argument of the round, never stacked)
  round_bytes          bytes XLA assigns to the one-vmap round: arguments (the base included), outputs and
                       temporaries, less donated buffers; its growth with C is what a client costs in memory
  loop_s               the same round FedJAX-style (and Flower's, clients one after another): one jitted per-client ``client_update`` called C times
                       from Python on the same data, then a jitted stack + aggregate + server step
  engine_over_loop     loop_s / engine_s (> 1: the engine's round is faster)
  vmap_over_loop       loop_s / round_s; loop_param_max_diff checks all three give the same params
  faults_per_round     minor page faults per one-vmap round
  bg_cores             CPU cores used by other processes while timing (from /proc/stat); > ~0.2 means the
                       numbers of that row are depressed by background load

glibc malloc is tuned as the CLI tunes it (fedjax_code/malloc.py; --no-malloc-tuning to skip).
stdout holds one JSON object per line, then the table (lines not starting with "{").

    .venv/bin/python benchmarks/round_throughput.py                  # defaults, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/round_throughput.py --quick          # smoke check, ~15 s
    .venv/bin/python benchmarks/round_throughput.py --scales cpu-1 --cohorts 4 --batches 2 --json-out r.json
    .venv/bin/python benchmarks/round_throughput.py --pretrained smollm2-135m-instruct --lora-rank 16 \
        --cohorts 1,4,16 --batches 1 --seq-len 64 --local-steps 1 --rounds 2      # LoRA on SmolLM2, ~15 minutes
"""

import sys

from fedjax_code.malloc import tune_malloc

# Before JAX starts its thread pool (a thread that already has its own arena would keep mmap'ing big blocks).
MALLOC_TUNED = __name__ == "__main__" and "--no-malloc-tuning" not in sys.argv and tune_malloc()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from fedjax_code.config import FederatedConfig  # noqa: E402
from fedjax_code.experiments.components import parallel_clients  # noqa: E402
from fedjax_code.federated import Cohort, aggregate, client_optimizer, client_update, fedavg  # noqa: E402
from fedjax_code.federated.algorithms import server_step  # noqa: E402
from fedjax_code.models import (flops_per_token, get_preset, init_params, load_pretrained, lora, loss_fn,  # noqa: E402
                                model_info, num_params)


def cpu_seconds():
    """(seconds busy on all cores from /proc/stat or None, seconds of CPU used by this process)."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own  # minus idle, iowait
    except (OSError, ValueError):
        return None, own


def once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_flops(n=2048, reps=8) -> float:
    """Best dense float32 n x n matmul FLOP/s: the denominator of MFU."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    return 2 * n**3 / min(once(lambda: jax.block_until_ready(f(a, a))) for _ in range(reps))


class Scale:
    """The jitted pieces for one model (a preset, or a pretrained model with LoRA adapters on a frozen base),
    compiled once per shape and reused across configurations. Every jitted function takes the frozen base as
    an argument (``{}`` for a preset, whose params are all trained), as the training engine does."""

    def __init__(self, name, lr, pretrained=None, lora_rank=0, lora_targets=("q", "v")):
        if pretrained is None:
            self.cfg, self.base = get_preset(name), {}
            self.params = init_params(self.cfg, jax.random.PRNGKey(0))
        else:
            pre = load_pretrained(pretrained)
            self.cfg = dataclasses.replace(pre.config, lora_rank=lora_rank, lora_targets=lora_targets)
            self.base, self.params = (pre.params, lora.init_adapters(self.cfg, jax.random.PRNGKey(0))) if lora_rank \
                else ({}, pre.params)
        self.loss = lambda base: lambda p, batch: loss_fn(lora.join(base, p), self.cfg, batch)
        self.opt = client_optimizer("sgd", lr)
        self.alg = fedavg(self.loss(self.base), self.opt)
        self.round_fns = {}  # clients in parallel (None: one vmap) -> the jitted round
        self.client_fn = jax.jit(lambda base, p, b, m: client_update(p, b, m, self.opt, self.loss(base))[0])

        def server(state, deltas, weights, mask):  # fedavg's own aggregation and default server optimizer
            stacked = jax.tree.map(lambda *d: jnp.stack(d), *deltas)
            return server_step(state, aggregate(stacked, weights, mask), optax.sgd(1.0))

        self.server_fn = jax.jit(server, donate_argnums=0)

    def round_fn(self, parallel):
        if parallel not in self.round_fns:
            apply = lambda base, *state: fedavg(self.loss(base), self.opt, parallel=parallel).apply(*state)  # noqa: E731
            self.round_fns[parallel] = jax.jit(apply, donate_argnums=(1, 2))
        return self.round_fns[parallel]

    def round_bytes(self, c, cohort):
        """Bytes XLA assigns to the one-vmap round (arguments, outputs, temporaries, less donated aliases)."""
        m = self.round_fn(None).lower(self.base, *self.fresh_state(c), cohort).compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes

    def fresh_state(self, c):
        return self.alg.init(jax.tree.map(jnp.copy, self.params), c)  # copy: the round donates params

    def bench(self, c, b, args):
        """Median seconds of the vmapped round, the engine's round and the loop, and the checks, for C=c, batch b."""
        e, t = args.local_steps, args.seq_len
        batches = jnp.asarray(np.random.default_rng(1000 * c + b).integers(0, self.cfg.vocab_size, (c, e, b, t + 1)),
                              jnp.int32)
        cohort = Cohort(ids=jnp.arange(c, dtype=jnp.int32), mask=jnp.ones(c, bool),
                        weights=jnp.ones(c, jnp.float32), batches=batches, step_mask=jnp.ones((c, e), bool))
        per_client = [(batches[i], cohort.step_mask[i]) for i in range(c)]
        f = FederatedConfig(batch_size=b, seq_len=t, clients_in_parallel=args.clients_in_parallel)
        parallel = parallel_clients(f, c, 1, jax.devices()[0].platform)
        variants = {"vmap": self.round_fn(None), "engine": self.round_fn(parallel)} if parallel else \
            {"vmap": self.round_fn(None)}
        states = {name: list(self.fresh_state(c)) for name in variants}
        loop_state = [self.fresh_state(c)[0]]

        def one_round(name):
            s = states[name]
            s[0], s[1], metrics = variants[name](self.base, s[0], s[1], cohort)
            jax.block_until_ready((s[0], metrics))

        def one_loop():
            p = loop_state[0].params
            deltas = [self.client_fn(self.base, p, bt, m) for bt, m in per_client]
            loop_state[0] = jax.block_until_ready(self.server_fn(loop_state[0], deltas, cohort.weights, cohort.mask))

        for name in variants:  # compile and warm up
            one_round(name)
        one_loop()
        times, faults = {name: [] for name in [*variants, "loop"]}, 0
        (busy0, own0), t0 = cpu_seconds(), time.perf_counter()
        for _ in range(args.rounds):  # alternate, so background load hits every variant alike
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times["vmap"].append(once(lambda: one_round("vmap")))
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            if "engine" in variants:
                times["engine"].append(once(lambda: one_round("engine")))
            times["loop"].append(once(one_loop))
        (busy1, own1), wall = cpu_seconds(), time.perf_counter() - t0
        bg = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
        # Every chain ran the same rounds on the same data: params agree up to float rounding (<= ~1e-7 here).
        diff = max(float(jnp.max(jnp.abs(x - y))) for s in states.values()
                   for x, y in zip(jax.tree.leaves(s[0].params), jax.tree.leaves(loop_state[0].params)))
        median = {name: statistics.median(ts) for name, ts in times.items()}
        median.setdefault("engine", median["vmap"])
        return median, parallel or c, faults / args.rounds, bg, diff, self.round_bytes(c, cohort)


def main():
    ints = lambda text: [int(x) for x in text.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="cpu-0.5,cpu-1,cpu-2", help="comma-separated model presets")
    p.add_argument("--cohorts", type=ints, default=[2, 4, 8], help="cohort sizes C")
    p.add_argument("--batches", type=ints, default=[1, 2, 8], help="per-client batch sizes B")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence T")
    p.add_argument("--local-steps", type=int, default=2, help="local SGD steps E")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per configuration (median reported)")
    p.add_argument("--lr", type=float, default=0.01, help="client SGD learning rate")
    p.add_argument("--clients-in-parallel", type=int, default=0,
                   help="clients the engine trains at once (0: automatic, as in training)")
    p.add_argument("--pretrained", default=None, metavar="SRC", help="time this pretrained model (a registered "
                   "name such as smollm2-135m-instruct, a .gguf file or a model directory) instead of --scales")
    p.add_argument("--lora-rank", type=int, default=0, help="with --pretrained: train LoRA adapters of this rank on "
                   "the frozen base (0: fine-tune every parameter)")
    p.add_argument("--lora-targets", default="q,v", help="with --lora-rank: comma-separated projections to adapt")
    p.add_argument("--json-out", help="also write all results to this file as a JSON list")
    p.add_argument("--quick", action="store_true", help="smoke check: cpu-0.5, C in 2,4, B=1, 2 rounds")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    args = p.parse_args()
    if args.quick:
        args.scales, args.cohorts, args.batches, args.rounds = "cpu-0.5", [2, 4], [1], 2

    t0 = time.perf_counter()
    peak = peak_flops()
    print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, malloc tuned: "
          f"{MALLOC_TUNED}; matmul peak {peak / 1e9:.0f} GFLOP/s", file=sys.stderr, flush=True)
    rows = []
    for name in [args.pretrained] if args.pretrained else args.scales.split(","):
        sc = Scale(name, args.lr, args.pretrained, args.lora_rank, tuple(args.lora_targets.split(",")))
        fpt = flops_per_token(sc.cfg, args.seq_len)
        for b in args.batches:
            for c in args.cohorts:
                t, parallel, faults, bg, diff, round_bytes = sc.bench(c, b, args)
                tokens = c * args.local_steps * b * args.seq_len
                rows.append({"scale": name, "cohort": c, "batch": b, "seq_len": args.seq_len,
                             "local_steps": args.local_steps, "params": model_info(sc.cfg)["params_total"],
                             "lora_rank": sc.cfg.lora_rank, "trainable_bytes": num_params(sc.params) * 4,
                             "base_bytes": num_params(sc.base) * 4, "round_bytes": round_bytes,
                             "clients_in_parallel": parallel, "tokens_per_s": tokens / t["engine"],
                             "client_updates_per_s": c / t["engine"],
                             "model_gflops_per_s": fpt * tokens / t["engine"] / 1e9,
                             "mfu": fpt * tokens / t["engine"] / peak, "engine_over_loop": t["loop"] / t["engine"],
                             "vmap_over_loop": t["loop"] / t["vmap"], "engine_s": t["engine"], "round_s": t["vmap"],
                             "loop_s": t["loop"], "loop_param_max_diff": diff, "faults_per_round": faults,
                             "bg_cores": bg, "malloc_tuned": MALLOC_TUNED, "peak_gflops_per_s": peak / 1e9})
                print(json.dumps(rows[-1]), flush=True)
    peak_end = peak_flops()
    if peak_end > peak:  # MFU against the best peak seen: background load only ever lowers it
        for r in rows:
            r["mfu"], r["peak_gflops_per_s"] = r["mfu"] * peak / peak_end, peak_end / 1e9
    peak = max(peak, peak_end)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)

    print(f"\n{'scale':<8} {'C':>2} {'B':>2} {'par':>3} {'params':>11} {'lora':>4} {'round_MB':>8} {'tokens/s':>9} "
          f"{'upd/s':>6} {'GFLOP/s':>7} {'mfu':>5} {'engine_s':>8} {'vmap_s':>8} {'loop_s':>8} {'eng/loop':>8} "
          f"{'vmap/loop':>9} {'bg':>4}")
    for r in rows:
        bg = "n/a" if r["bg_cores"] is None else f"{r['bg_cores']:.1f}"
        print(f"{r['scale']:<8} {r['cohort']:>2} {r['batch']:>2} {r['clients_in_parallel']:>3} {r['params']:>11,} "
              f"{r['lora_rank']:>4} {r['round_bytes'] / 1e6:>8.1f} {r['tokens_per_s']:>9.0f} {r['client_updates_per_s']:>6.2f} {r['model_gflops_per_s']:>7.1f} "
              f"{r['mfu']:>5.2f} {r['engine_s']:>8.4f} {r['round_s']:>8.4f} {r['loop_s']:>8.4f} "
              f"{r['engine_over_loop']:>8.2f} {r['vmap_over_loop']:>9.2f} {bg:>4}")
    print(f"# T={args.seq_len} E={args.local_steps}, median of {args.rounds} rounds; mfu vs fp32 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
