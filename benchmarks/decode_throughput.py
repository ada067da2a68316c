"""KV-cache sampling throughput (decode tokens/s, prefill ms) on the demo's models: one JSON object, then a table.

For every scale s it builds ``scale(get_preset("cpu-1"), s)`` with vocab_size 4096, random-init params and 16
random-token prompts of 60-150 tokens (fixed seed), then calls ``generate_with_stats`` (temperature 0.8,
top_p 0.95, no EOS, so every row decodes all ``--max-new-tokens``) once to compile and ``--repeats`` times
timed, and reports the medians of its own stats:

  decode_tokens_per_s  generated tokens / seconds in the jitted sampling loop (prefill excluded)
  prefill_ms           seconds of the jitted prefill of the left-padded prompts, in ms
  bg_cores             CPU cores used by other processes while timing (from /proc/stat); > ~0.2 means the
                       numbers of that row are depressed by background load

glibc malloc is tuned as the CLI tunes it (fedjax_code/malloc.py; --no-malloc-tuning to skip).
stdout holds one JSON object on one line, then the table (lines not starting with "{").

    .venv/bin/python benchmarks/decode_throughput.py                       # scales 0.5,1,2; ~1 minute on 2 cores
    .venv/bin/python benchmarks/decode_throughput.py --scales 0.5 --repeats 1 --max-new-tokens 16   # smoke check
"""

import sys

from fedjax_code.malloc import tune_malloc

# Before JAX starts its thread pool (as in round_throughput.py).
MALLOC_TUNED = __name__ == "__main__" and "--no-malloc-tuning" not in sys.argv and tune_malloc()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedjax_code.models import get_preset, init_params, model_info, scale  # noqa: E402
from fedjax_code.models.decode import generate_with_stats  # noqa: E402
from round_throughput import cpu_seconds  # noqa: E402  (this directory: the same background-load measure)

VOCAB, N_PROMPTS, PROMPT_LENS = 4096, 16, (60, 150)
TEMPERATURE, TOP_P = 0.8, 0.95


def prompts(seed=0):
    """N_PROMPTS lists of random token ids (1..VOCAB-1) with lengths uniform in PROMPT_LENS."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(PROMPT_LENS[0], PROMPT_LENS[1] + 1, N_PROMPTS)
    return [rng.integers(1, VOCAB, int(n)).tolist() for n in lengths]


def bench(factor: float, args) -> dict:
    """Median decode tokens/s and prefill seconds of ``generate_with_stats`` at one model scale."""
    cfg = dataclasses.replace(scale(get_preset("cpu-1"), factor), vocab_size=VOCAB)
    params, batch = init_params(cfg, jax.random.PRNGKey(0)), prompts()

    def call(i):
        return generate_with_stats(params, cfg, batch, max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE,
                                   top_p=TOP_P, key=jax.random.PRNGKey(i), eos_id=None, pad_id=0,
                                   stop_token_seqs=(), bucket=32)[1]

    call(0)  # compile
    (busy0, own0), t0 = cpu_seconds(), time.perf_counter()
    stats = [call(i + 1) for i in range(args.repeats)]
    (busy1, own1), wall = cpu_seconds(), time.perf_counter() - t0
    assert all(s["num_generated"] == N_PROMPTS * args.max_new_tokens for s in stats), stats
    return {"scale": factor, "params": model_info(cfg)["params_total"], "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "decode_tokens_per_s": statistics.median(s["decode_tokens_per_s"] for s in stats),
            "prefill_ms": 1e3 * statistics.median(s["prefill_s"] for s in stats),
            "decode_s": statistics.median(s["decode_s"] for s in stats),
            "bg_cores": None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="0.5,1,2", help="comma-separated scale factors of the cpu-1 preset")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per scale (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    args = p.parse_args()

    t0 = time.perf_counter()
    rows = [bench(float(s), args) for s in args.scales.split(",")]
    print(json.dumps({"benchmark": "decode_throughput", "jax": jax.__version__, "platform": jax.devices()[0].platform,
                      "cpus": os.cpu_count(), "malloc_tuned": MALLOC_TUNED, "prompts": N_PROMPTS,
                      "prompt_lens": PROMPT_LENS, "vocab_size": VOCAB, "temperature": TEMPERATURE, "top_p": TOP_P,
                      "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "rows": rows}), flush=True)
    print(f"\n{'scale':>5} {'params':>10} {'d':>4} {'L':>2} {'decode tok/s':>12} {'prefill ms':>10} {'bg':>4}")
    for r in rows:
        bg = "n/a" if r["bg_cores"] is None else f"{r['bg_cores']:.1f}"
        print(f"{r['scale']:>5g} {r['params']:>10,} {r['d_model']:>4} {r['n_layers']:>2} "
              f"{r['decode_tokens_per_s']:>12.0f} {r['prefill_ms']:>10.1f} {bg:>4}")
    print(f"# {N_PROMPTS} prompts of {PROMPT_LENS[0]}-{PROMPT_LENS[1]} tokens, {args.max_new_tokens} new tokens each, "
          f"T={TEMPERATURE} top_p={TOP_P}; median of {args.repeats}; total {time.perf_counter() - t0:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
