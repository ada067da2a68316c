"""What makes the demo's federated training progress per token: one change at a time, then the best together.

Every variant trains one base setting with ``experiments.run.train`` into a temporary run directory, on the same
token budget: rounds = tokens / (cohort C * E * B * T), so E=8 trains half the rounds of E=4. Bases (--base):
  e16-20mb (default)  today's recipe: 20 MB of the default corpus, a 4,096-token BPE, the cpu-1 model at scale 0.5
                      (tied head), FedAvg over 25% of 16 IID clients, E=16 local AdamW steps of 4 x 128 tokens at
                      client lr 0.003, cosine schedule with 10% warm-up
  e4-5mb              the first recipe: 5 MB, scale 1, E=4, constant client lr 0.003 (the README's first table)

Variants (each ONE change from the baseline; warm-up is 10% of the variant's rounds):
  baseline            the demo's setting, constant learning rates
  client-cosine       client_lr_schedule=cosine (warm-up, decay to 0.1 x lr at the last round)
  cosine-lr0.01       client-cosine at client_lr 0.01
  cosine-lr0.001      client-cosine at client_lr 0.001
  local-steps-8/16    E = 8 or 16 (fewer rounds)
  fedavgm             server momentum 0.9 at server lr 1 (Hsu et al. 2019)
  fedadam-0.01/0.001  FedAdam server at lr 0.01 or 0.001 (Reddi et al. 2021)
  lr0.006             client lr 0.006
  untied-head         model.tie_embeddings = false: an output head of its own
  untied-lr0.006/0.01 the untied head at client lr 0.006 or 0.01
  best                per group (client lr/schedule, local steps, server), the variant that beat the baseline
                      most, all applied together (the baseline itself if none did)

Metrics (one JSON object per variant on stdout, flushed as it goes; comments go to stderr):
  eval_loss           final held-out loss (nats/token; RunSummary.eval_loss: all clients, held-out-token weighted)
  unigram_entropy     entropy (nats) of the prepared corpus's token-unigram distribution: the loss of a model
                      that ignores context; eval_loss - unigram_entropy < 0 is what context bought
  unigram_eval_ce     cross-entropy (nats) of the very targets eval_loss scores (the first eval_windows
                      held-out windows of each client, weighted alike) under the train splits' unigram: the
                      context-free baseline of eval_loss itself (those windows open files: license headers,
                      docstrings, imports, so their unigram cross-entropy is well above unigram_entropy)
  train_wall_s        seconds of the rounds (compilation included; evaluation and data preparation not)

glibc malloc is tuned as the CLI tunes it (fedjax_code/malloc.py; --no-malloc-tuning to skip).
stdout holds one JSON object per line, then the table (lines not starting with "{").

    .venv/bin/python benchmarks/training_recipe.py                  # 600k tokens a variant, ~40 s each on 2 cores
    .venv/bin/python benchmarks/training_recipe.py --quick          # smoke check on a tiny corpus and model, < 60 s
    .venv/bin/python benchmarks/training_recipe.py --variants lr0.006,untied-head,untied-lr0.006 --seed 1
    .venv/bin/python benchmarks/training_recipe.py --base e4-5mb --tokens 800000   # the README's first table
"""

import sys

from fedjax_code.malloc import tune_malloc

# Before JAX starts its thread pool (as in round_throughput.py).
MALLOC_TUNED = __name__ == "__main__" and "--no-malloc-tuning" not in sys.argv and tune_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fedjax_code.config import load_experiment  # noqa: E402
from fedjax_code.data.prepare import load_prepared  # noqa: E402
from fedjax_code.experiments import components  # noqa: E402
from fedjax_code.experiments.run import train  # noqa: E402
from fedjax_code.federated import cohort_size  # noqa: E402

E4_5MB = {"data.max_bytes": 5_000_000, "data.vocab_size": 4096, "data.scheme": "iid", "data.clients": 16,
          "model.base": "cpu-1", "model.scale": 1.0, "federated.participation": 0.25, "federated.local_steps": 4,
          "federated.batch_size": 4, "federated.seq_len": 128, "federated.client_optimizer": "adamw",
          "federated.client_lr": 0.003, "train.eval_windows": 4}
COSINE = {"federated.client_lr_schedule": "cosine", "warmup_frac": 0.1}
E16_20MB = {**E4_5MB, **COSINE, "data.max_bytes": 20_000_000, "model.scale": 0.5, "federated.local_steps": 16,
            "train.eval_windows": 8}
BASES = {"e16-20mb": E16_20MB, "e4-5mb": E4_5MB}
QUICK = {**E4_5MB, "data.max_bytes": 300_000, "data.max_file_bytes": 8000, "data.vocab_size": 512,
         "model.base": "cpu-0.25", "model.scale": 0.5, "federated.batch_size": 2, "federated.seq_len": 32,
         "federated.local_steps": 2, "train.eval_windows": 2}
# name -> (group, overrides); "warmup_frac" becomes federated.warmup_rounds for the variant's rounds.
VARIANTS = {
    "baseline": (None, {}),
    "client-cosine": ("client", COSINE),
    "cosine-lr0.01": ("client", {**COSINE, "federated.client_lr": 0.01}),
    "cosine-lr0.001": ("client", {**COSINE, "federated.client_lr": 0.001}),
    "local-steps-8": ("local", {"federated.local_steps": 8}),
    "local-steps-16": ("local", {"federated.local_steps": 16}),
    "fedavgm": ("server", {"federated.algorithm": "fedavgm", "federated.server_lr": 1.0,
                           "federated.server_momentum": 0.9}),
    "fedadam-0.01": ("server", {"federated.algorithm": "fedadam", "federated.server_lr": 0.01}),
    "fedadam-0.001": ("server", {"federated.algorithm": "fedadam", "federated.server_lr": 0.001}),
    "lr0.006": ("client", {"federated.client_lr": 0.006}),
    "untied-head": ("model", {"model.tie_embeddings": False}),
    "untied-lr0.006": ("model", {"model.tie_embeddings": False, "federated.client_lr": 0.006}),
    "untied-lr0.01": ("model", {"model.tie_embeddings": False, "federated.client_lr": 0.01}),
}


def experiment(base: dict, change: dict, tokens: int):
    """The validated config of base + change at ``tokens`` training tokens (whole rounds; eval at the end only)."""
    d = {**base, **change}
    frac = d.pop("warmup_frac", 0.0)
    per_round = (cohort_size(d["data.clients"], d["federated.participation"]) * d["federated.local_steps"]
                 * d["federated.batch_size"] * d["federated.seq_len"])
    rounds = max(1, tokens // per_round)
    d.update({"federated.rounds": rounds, "federated.warmup_rounds": round(frac * rounds),
              "train.eval_every": rounds, "train.checkpoint_every": rounds})
    return load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in d.items()])


def unigram_references(cfg) -> tuple[float, float]:
    """(entropy of the prepared corpus's token unigram, cross-entropy of the evaluated held-out targets under
    the train splits' unigram (add-1/2), weighted over clients as eval_loss is), in nats."""
    data = components.client_data(cfg, progress=False)
    counts = np.bincount(np.asarray(load_prepared(data.tokenizer_dir.parent)[2]), minlength=cfg.data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    shards, f = data.shards, cfg.federated
    train = np.concatenate([np.asarray(shards.tokens[start:split]) for start, split, _ in shards.bounds])
    q = np.bincount(train, minlength=cfg.data.vocab_size) + 0.5
    log_q = np.log(q / q.sum())
    per_client = [-log_q[shards.heldout(c, f.seq_len, cfg.train.eval_windows)[:, 1:]].mean()
                  for c in range(shards.num_clients)]
    weights = np.maximum(shards.bounds[:, 2] - shards.bounds[:, 1], 1)  # as experiments.run's eval_loss
    return float(-(p * np.log(p)).sum()), float(np.average(per_client, weights=weights))


def run(name: str, base: dict, change: dict, tokens: int, refs: tuple[float, float]) -> dict:
    cfg = experiment(base, change, tokens)
    with tempfile.TemporaryDirectory(prefix=f"recipe-{name}-") as out:
        s = train(cfg, out, progress=False)
    f = cfg.federated
    row = {"variant": name, "change": {k.split(".")[-1]: v for k, v in change.items()}, "rounds": s.rounds,
           "local_steps": f.local_steps, "client_lr": f.client_lr, "client_lr_schedule": f.client_lr_schedule,
           "warmup_rounds": f.warmup_rounds, "algorithm": f.algorithm, "server_lr": f.server_lr,
           "tokens_seen": s.tokens_seen, "eval_loss": s.eval_loss, "final_train_loss": s.final_train_loss,
           "unigram_entropy": refs[0], "eval_minus_entropy": s.eval_loss - refs[0], "unigram_eval_ce": refs[1],
           "eval_minus_unigram_ce": s.eval_loss - refs[1], "train_wall_s": s.train_wall_s,
           "train_tokens_per_s": s.train_tokens_per_s, "params": s.model["params_total"], "malloc_tuned": MALLOC_TUNED}
    print(json.dumps(row), flush=True)
    return row


def best_change(rows: list[dict]) -> dict:
    """Per group, the overrides of the variant with the lowest eval_loss if below the baseline's, merged."""
    base_loss = next(r["eval_loss"] for r in rows if r["variant"] == "baseline")
    change = {}
    for group in {g for g, _ in VARIANTS.values() if g}:
        tried = [r for r in rows if VARIANTS.get(r["variant"], (None,))[0] == group and r["eval_loss"] < base_loss]
        if tried:
            change.update(VARIANTS[min(tried, key=lambda r: r["eval_loss"])["variant"]][1])
    return change


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", choices=BASES, default="e16-20mb", help="the setting every variant changes (see above)")
    p.add_argument("--tokens", type=int, default=600_000, help="training tokens per variant (the same for all)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated variants (baseline is always run; 'best' follows when any other is)")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed (init, sampling, partition)")
    p.add_argument("--json-out", help="also write all results to this file as a JSON list")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 0.3 MB corpus, cpu-0.25 at 0.5, 2 rounds; baseline, client-cosine, fedadam-0.01")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    args = p.parse_args()
    base = {**(QUICK if args.quick else BASES[args.base]), "seed": args.seed}
    names = ["baseline", "client-cosine", "fedadam-0.01"] if args.quick else args.variants.split(",")
    tokens = 2 * 4 * 2 * 2 * 32 if args.quick else args.tokens
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")

    t0 = time.perf_counter()
    refs = unigram_references(experiment(base, {}, tokens))  # prepares the data once, outside every timing
    print(f"# unigram entropy {refs[0]:.4f} nats, on the evaluated windows {refs[1]:.4f}; {tokens:,} tokens per "
          f"variant; malloc tuned: {MALLOC_TUNED}", file=sys.stderr, flush=True)
    rows = [run(n, base, VARIANTS[n][1], tokens, refs) for n in ["baseline", *(n for n in names if n != "baseline")]]
    if len(rows) > 1:
        rows.append(run("best", base, best_change(rows), tokens, refs))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)

    base_loss = rows[0]["eval_loss"]
    print(f"\n{'variant':<15} {'rounds':>6} {'E':>3} {'client lr':>9} {'schedule':>8} {'warm':>4} {'server':>8} "
          f"{'s_lr':>6} {'eval_loss':>9} {'vs base':>8} {'- H_1':>7} {'- CE_1':>7} {'train_s':>7}")
    for r in rows:
        print(f"{r['variant']:<15} {r['rounds']:>6} {r['local_steps']:>3} {r['client_lr']:>9g} "
              f"{r['client_lr_schedule']:>8} {r['warmup_rounds']:>4} {r['algorithm']:>8} {r['server_lr']:>6g} "
              f"{r['eval_loss']:>9.4f} {r['eval_loss'] - base_loss:>+8.4f} {r['eval_minus_entropy']:>+7.3f} "
              f"{r['eval_minus_unigram_ce']:>+7.3f} "
              f"{r['train_wall_s']:>7.1f}")
    print(f"# best = {rows[-1]['change'] or 'the baseline'}; corpus unigram entropy H_1 = {refs[0]:.4f} nats, "
          f"unigram cross-entropy of the evaluated held-out windows CE_1 = {refs[1]:.4f}; "
          f"{tokens:,} tokens per variant; total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
