"""Sampled HumanEval completions per second: the ``eval humaneval`` sampler against transformers' ``generate`` as
bigcode-evaluation-harness calls it, on the same problems, n, temperature, top-p and max new tokens: one JSON
object, then a table.

Workload: HumanEval problems ``--problems START:END`` (``he.select_problems``), ``--n`` samples each, at
``--temperature`` / ``--top-p``, up to ``--max-new-tokens`` tokens per sample, stopping at HumanEval's stop
strings (``decode.HUMANEVAL_STOP``) or EOS. Both sides get the same prompt token ids: ``prompt_prefix`` + the
stripped prompt's ids (``he.split_prompt``; ``pretrained_reference.prompt_ids``). Both run on the CPU in float32.

  ours  ``he.sample_completions(params, config, tokenizer, problems, n=..., ..., prefix=prompt_prefix(tok, True))``,
        exactly what ``fedjax-code eval humaneval --model SRC`` runs, with ``--slots`` decode slots. One short
        warm-up call first (the first problem, n=2, 8 new tokens) compiles the prefill and some sampler shapes;
        shapes it does not cover (other prompt buckets and cache windows) compile inside the timed call, so the
        timed wall includes that compilation (a persistent JAX cache skips it on a rerun), plus the prompts'
        encoding and the decoding/truncation of completions to text. generated_tokens is the sampler's own count: tokens
        up to and including a row's stop sequence or EOS. Its stats (decode_s, ...) are copied to ours_stats.
  peer  transformers' ``model.generate`` from the same source (``decode_throughput.load_hf_model``: the GGUF
        through ``gguf_file=``, dequantized to float32), one call per problem: the prompt as a batch of one,
        ``do_sample=True, temperature, top_p, top_k=0`` (bigcode's default: no top-k, as ours),
        ``num_return_sequences=n, max_new_tokens, stop_strings=HUMANEVAL_STOP, tokenizer=...``;
        ``torch.manual_seed(--seed)``. The same warm-up call first (it also builds transformers' stop-string
        tables for the vocabulary, cached for the later calls). Timed: the generate calls only (prompt ids
        prepared before, outputs counted after). generated_tokens counts per returned sequence the tokens up to
        and including the first stop string or special token (EOS): the useful tokens, as ours counts them;
        raw_tokens is everything it computed (n x the longest row of each call, finished rows padded).

Per side: wall_s, generated_tokens, tokens_per_s (generated_tokens / wall_s), samples_per_s (problems x n /
wall_s), warmup_s, bg_cores (CPU cores used by other processes while timing, from /proc/stat; > ~0.2 means that
side's numbers are depressed by background load); speedup_tokens_per_s = ours / peer tokens_per_s.
Note the two stop differently: ours stops a row when its token ids end with a stop string's own tokenization
(or a special token), transformers when the decoded text holds a stop string, so ours may run a row on where
the stop string's characters are tokenized differently in context (merged with their neighbours); each side
counts the tokens it produced up to its own stop.

torch's intra-op pool has one thread per core by default; under background load it can be many times slower
(see decode_throughput.py): check the bg column and compare with ``--torch-threads 1``.
glibc malloc is tuned as the CLI tunes it (fedjax_code/malloc.py; --no-malloc-tuning to skip).
stdout holds one JSON object on one line, then the table (lines not starting with "{").

    .venv/bin/python benchmarks/sampling_throughput.py --out sampling.json     # all 164 problems, n=10, 256 tokens
    .venv/bin/python benchmarks/sampling_throughput.py --problems 0:2 --n 2 --max-new-tokens 16   # smoke check
"""

import sys

from fedjax_code.malloc import tune_malloc

# Before JAX starts its thread pool (as in round_throughput.py).
MALLOC_TUNED = __name__ == "__main__" and "--no-malloc-tuning" not in sys.argv and tune_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from fedjax_code.config import EvalConfig  # noqa: E402
from fedjax_code.eval import humaneval as he  # noqa: E402
from fedjax_code.models import load_pretrained, model_info  # noqa: E402
from fedjax_code.models.decode import HUMANEVAL_STOP  # noqa: E402
from decode_throughput import bg_cores, cpu_seconds, load_hf_model  # noqa: E402  (this directory)
from pretrained_reference import prompt_ids  # noqa: E402  (this directory: the bigcode prompt's token ids)

WARMUP = {"problems": 1, "n": 2, "max_new_tokens": 8}


def ours_side(m, problems, args) -> dict:
    """Time ``he.sample_completions`` (after a short warm-up call) on ``problems``."""
    kwargs = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  prefix=he.prompt_prefix(m.tokenizer, True), progress=False, slots=args.slots)
    t0 = time.perf_counter()
    he.sample_completions(m.params, m.config, m.tokenizer, problems[:WARMUP["problems"]], n=WARMUP["n"],
                          max_new_tokens=min(WARMUP["max_new_tokens"], args.max_new_tokens), **kwargs)
    warmup = time.perf_counter() - t0
    before, t0 = cpu_seconds(), time.perf_counter()
    samples, stats = he.sample_completions(m.params, m.config, m.tokenizer, problems, n=args.n,
                                           max_new_tokens=args.max_new_tokens, **kwargs)
    wall = time.perf_counter() - t0
    bg = bg_cores(before, cpu_seconds(), wall)
    assert len(samples) == len(problems) * args.n, len(samples)
    generated = int(stats["generated_tokens"])
    return {"wall_s": wall, "generated_tokens": generated, "tokens_per_s": generated / wall,
            "samples_per_s": len(samples) / wall, "warmup_s": warmup, "bg_cores": bg, "stats": dict(stats)}


def step_profile(m, slots: int, windows: list[int], steps: int = 8) -> list[dict]:
    """ms per decode step of ``slots`` rows (the model's forward pass only, per-row cache writes included, no
    sampling) with a cache window of each length: the weights' share is the time at the smallest window, the
    attention's grows with the window."""
    from jax import lax

    from fedjax_code.models.decoder import Decoder, init_cache

    rows = []
    for window in windows:
        pos = jnp.full(slots, window // 2, jnp.int32)
        mask = (jnp.arange(window)[None] <= pos[:, None])[:, None]

        def run(params, cache):
            def body(i, carry):
                logits, cache = Decoder(m.config).apply({"params": params}, jnp.zeros((slots, 1), jnp.int32),
                                                        pos[:, None], carry[0], pos, mask)
                return cache, logits[:, 0]
            return lax.fori_loop(0, steps, body, (cache, jnp.zeros((slots, m.config.vocab_size))))

        run = jax.jit(run, donate_argnums=1)
        cache = jax.block_until_ready(run(m.params, jax.tree.map(jnp.copy, init_cache(m.config, slots, window))))[0]
        t0 = time.perf_counter()
        jax.block_until_ready(run(m.params, cache))
        rows.append({"window": window, "ms_per_step": 1e3 * (time.perf_counter() - t0) / steps})
    return rows


def useful_tokens(row: list[int], tokenizer, special: set[int], stops=HUMANEVAL_STOP) -> int:
    """Tokens of one generated row up to and including the first special token (EOS, pad) or the token that
    completes the first stop string in the decoded text (the row's whole length if neither occurs)."""
    end = next((i + 1 for i, t in enumerate(row) if t in special), len(row))

    def stopped(k):  # the text of the first k tokens holds a stop string (monotone in k)
        text = tokenizer.decode(row[:k], skip_special_tokens=True)
        return any(s in text for s in stops)

    if not stopped(end):
        return end
    lo, hi = 1, end  # the smallest k in [lo, hi] with stopped(k)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
    return lo


def peer_side(hf_model, m, problems, args) -> dict:
    """Time transformers' ``generate`` (one call per problem, num_return_sequences=n) on ``problems``."""
    tok = m.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sampling = (dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0)
                if args.temperature > 0 else dict(do_sample=False))
    common = dict(stop_strings=list(HUMANEVAL_STOP), tokenizer=tok, pad_token_id=pad, **sampling)
    ids = [prompt_ids(m, p) for p in problems]

    def call(prompt, n, max_new_tokens):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    num_return_sequences=n, max_new_tokens=max_new_tokens, **common)
        return out[:, len(prompt):].tolist()

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    call(ids[0], WARMUP["n"], min(WARMUP["max_new_tokens"], args.max_new_tokens))
    warmup = time.perf_counter() - t0
    outs = []
    before, t0 = cpu_seconds(), time.perf_counter()
    for prompt in ids:
        outs.append(call(prompt, args.n, args.max_new_tokens))
    wall = time.perf_counter() - t0
    bg = bg_cores(before, cpu_seconds(), wall)
    special = set(tok.all_special_ids) | {pad}
    generated = sum(useful_tokens(row, tok, special) for rows in outs for row in rows)
    raw = sum(len(rows) * len(rows[0]) for rows in outs)
    samples = sum(len(rows) for rows in outs)
    assert samples == len(problems) * args.n, samples
    return {"wall_s": wall, "generated_tokens": generated, "tokens_per_s": generated / wall,
            "samples_per_s": samples / wall, "raw_tokens": raw, "raw_tokens_per_s": raw / wall, "warmup_s": warmup,
            "bg_cores": bg}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="anything fedjax_code.models.load_pretrained takes (registered name, .gguf file, HF dir)")
    p.add_argument("--problems", default="0:164", help="HumanEval problems START:END (Python slice)")
    p.add_argument("--n", type=int, default=10, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="our sampling seed and torch.manual_seed")
    p.add_argument("--slots", type=int, default=EvalConfig.slots, help="ours only: decode slots")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch.set_num_threads for transformers (0: torch's default, one per core)")
    p.add_argument("--skip-peer", action="store_true", help="time ours only")
    p.add_argument("--skip-ours", action="store_true", help="time transformers only")
    p.add_argument("--profile-windows", default="",
                   help="comma-separated cache windows: also time our forward step at each (weights vs attention)")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    args = p.parse_args()

    t_start = time.perf_counter()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    problems = he.select_problems(args.problems)
    m = load_pretrained(args.model)
    ours = None if args.skip_ours else ours_side(m, problems, args)
    peer = None if args.skip_peer else peer_side(load_hf_model(args.model), m, problems, args)
    windows = [int(w) for w in args.profile_windows.split(",") if w]
    profile = step_profile(m, args.slots, windows) if windows else None

    def side(name, r, keys):
        return {f"{name}_{k}": (None if r is None else r.get(k)) for k in keys}

    result = {
        "benchmark": "sampling_throughput",
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "platform": jax.devices()[0].platform, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "malloc_tuned": MALLOC_TUNED, "source": m.source, "params": model_info(m.config)["params_total"],
        "problems": len(problems), "problem_range": args.problems, "n": args.n, "temperature": args.temperature,
        "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
        "slots": args.slots, "warmup": WARMUP,
        **side("ours", ours, ["wall_s", "generated_tokens", "tokens_per_s", "samples_per_s", "warmup_s", "bg_cores"]),
        "ours_stats": None if ours is None else ours["stats"],
        **side("peer", peer, ["wall_s", "generated_tokens", "tokens_per_s", "samples_per_s", "raw_tokens",
                              "raw_tokens_per_s", "warmup_s", "bg_cores"]),
        "speedup_tokens_per_s": ours["tokens_per_s"] / peer["tokens_per_s"] if ours and peer else None,
        "step_profile": profile,
    }
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")

    print(f"\n{'side':<5} {'wall s':>8} {'samples':>7} {'tokens':>8} {'tok/s':>8} {'samples/s':>9} {'raw tok/s':>9} "
          f"{'warm-up s':>9} {'bg':>4}")
    for name, r in (("ours", ours), ("peer", peer)):
        if r is None:
            print(f"{name:<5} {'skipped':>8}")
            continue
        bg = "n/a" if r["bg_cores"] is None else f"{r['bg_cores']:.1f}"
        raw = f"{r['raw_tokens_per_s']:.1f}" if "raw_tokens_per_s" in r else "-"
        print(f"{name:<5} {r['wall_s']:>8.1f} {len(problems) * args.n:>7} {r['generated_tokens']:>8} "
              f"{r['tokens_per_s']:>8.1f} {r['samples_per_s']:>9.2f} {raw:>9} {r['warmup_s']:>9.1f} {bg:>4}")
    for r in profile or []:
        print(f"# forward step, {args.slots} slots, cache window {r['window']}: {r['ms_per_step']:.0f} ms")
    speedup = result["speedup_tokens_per_s"]
    print(f"# {m.source}: {len(problems)} problems ({args.problems}) x n={args.n}, T={args.temperature} "
          f"top_p={args.top_p}, <= {args.max_new_tokens} new tokens; ours = eval humaneval's sampler"
          f"{f' (slots {args.slots})' if result['slots'] else ''}, peer = transformers generate "
          f"(torch threads {torch.get_num_threads()}); speedup (tok/s) "
          f"{'n/a' if speedup is None else f'{speedup:.2f}'}; total {time.perf_counter() - t_start:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
