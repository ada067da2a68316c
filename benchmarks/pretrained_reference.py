"""Our import and sampler of a pretrained model against transformers' own: logits and greedy HumanEval completions.

1. Logits: the first ``--logit-prompts`` HumanEval prompts (bigcode convention: stripped) as one left-padded
   batch, through ``models.logits`` and through transformers' PyTorch model loaded from the same source
   (``gguf_file=`` for a GGUF, as transformers' GGUF loader dequantizes it); max abs difference over real positions.
2. Greedy completions: transformers' ``generate`` (batch 1, greedy, the same prompt ids, the same stop token
   sequences and ``--max-new-tokens``), decoded and cut exactly as ``eval humaneval`` does, against the
   samples.jsonl of ``fedjax-code eval humaneval --model SRC --n 1 --temperature 0`` (``--ours``); the fraction
   identical, and pass@1 of both, scored by the same sandbox.

stdout: one JSON object on one line, then a table. transformers' samples.jsonl and results go to ``--out``.

    .venv/bin/fedjax-code eval humaneval --model smollm2-135m-instruct --n 1 --temperature 0 --k 1 --out runs/he-greedy
    .venv/bin/python benchmarks/pretrained_reference.py --model smollm2-135m-instruct --ours runs/he-greedy \\
        --out runs/he-greedy-transformers          # about 15 minutes on 2 cores
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from fedjax_code.eval import humaneval as he
from fedjax_code.models import load_pretrained, logits
from fedjax_code.models.decode import truncate_completion
from fedjax_code.records import write_atomic
from decode_throughput import load_hf_model  # this directory: transformers' own model of a source


def prompt_ids(model, problem) -> list[int]:
    text, _ = he.split_prompt(problem["prompt"])
    return he.prompt_prefix(model.tokenizer, True) + model.tokenizer.encode(text, add_special_tokens=False)


def logits_difference(ours, theirs, problems) -> float:
    rows = [prompt_ids(ours, p) for p in problems]
    width = max(map(len, rows))
    tokens, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, 1
    mine = np.asarray(logits(ours.config, ours.params, tokens, mask))
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))).logits.numpy()
    return float(np.abs(mine - ref)[mask.astype(bool)].max())


class StopOnTokens(transformers.StoppingCriteria):
    """Stop when the generated ids end with one of ``stops`` (token-id sequences), as our sampling loop does."""

    def __init__(self, stops, prompt_len):
        self.stops, self.prompt_len = [list(s) for s in stops if s], prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids[0, self.prompt_len:].tolist()
        return torch.tensor([any(generated[-len(s):] == s for s in self.stops if len(generated) >= len(s))])


def greedy_completions(ours, theirs, problems, max_new_tokens) -> tuple[list[dict], float, int]:
    tok, stops, samples, generated = ours.tokenizer, he.stop_token_seqs(ours.tokenizer), [], 0
    start = time.perf_counter()
    for p in tqdm(problems, desc="transformers generate", file=sys.stderr):
        ids = prompt_ids(ours, p)
        with torch.no_grad():
            out = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id,
                                  stopping_criteria=[StopOnTokens(stops, len(ids))])[0, len(ids):].tolist()
        generated += len(out)
        text = truncate_completion(tok.decode(out, skip_special_tokens=True))
        samples.append({"task_id": p["task_id"], "completion": he.to_completion(text, he.split_prompt(p["prompt"])[1])})
    return samples, time.perf_counter() - start, generated


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a registered name, .gguf file or HF directory")
    p.add_argument("--ours", type=Path, required=True, help="an `eval humaneval --model ... --n 1 --temperature 0` dir")
    p.add_argument("--out", type=Path, required=True, help="where transformers' samples and results go")
    p.add_argument("--logit-prompts", type=int, default=8)
    args = p.parse_args()

    record = json.loads((args.ours / "humaneval.json").read_text())
    if record.get("n") != 1 or record.get("temperature") != 0:
        sys.exit(f"{args.ours} is not a greedy evaluation (n=1, temperature 0)")
    ours_samples = [json.loads(line) for line in (args.ours / "samples.jsonl").read_text().splitlines()]
    problems = {q["task_id"]: q for q in he.select_problems()}
    chosen = [problems[s["task_id"]] for s in ours_samples]
    ours, theirs = load_pretrained(args.model), load_hf_model(args.model)
    diff = logits_difference(ours, theirs, chosen[: args.logit_prompts])
    samples, seconds, generated = greedy_completions(ours, theirs, chosen, record["max_new_tokens"])
    results, scoring = he.score(samples, problems, [1], record["timeout"], 0, True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_atomic(args.out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    same = [a["completion"] == b["completion"] for a, b in zip(ours_samples, samples)]
    summary = {"benchmark": "pretrained_reference", "model": args.model, "transformers": transformers.__version__,
               "torch": torch.__version__, "problems": len(chosen), "logit_prompts": args.logit_prompts,
               "logits_max_abs_diff": diff, "identical_completions": sum(same), "identical_fraction": np.mean(same),
               "differing_tasks": [s["task_id"] for s, ok in zip(samples, same) if not ok],
               "ours_pass@1": record["pass_at_k"]["pass@1"], "transformers_pass@1": scoring["pass_at_k"]["pass@1"],
               "ours_decode_s": record["decode_s"], "transformers_generate_s": round(seconds, 1),
               "transformers_generated_tokens": generated}
    print(json.dumps(summary), flush=True)
    print(f"\n{'':<28}{'ours':>12}{'transformers':>14}")
    print(f"{'pass@1 (greedy)':<28}{summary['ours_pass@1']:>12.4f}{summary['transformers_pass@1']:>14.4f}")
    print(f"{'decode wall s':<28}{summary['ours_decode_s']:>12.1f}{summary['transformers_generate_s']:>14.1f}")
    print(f"identical completions: {sum(same)}/{len(same)}; logits max |diff| {diff:.2e} "
          f"over {args.logit_prompts} left-padded prompts")


if __name__ == "__main__":
    main()
