"""A sweep directory's finished cells as rows: each cell's axes, config, run summary and HumanEval record
(``results_rows``, the columns of results.csv), its round records, and the pretrained models' evaluations
before fine-tuning. ``report`` turns them into the report; notebooks read them directly.

A row's loss, worst-10% loss, rounds to target, HumanEval and decoding figures are of its ``evaluated_model``:
the global model (or messenger), or where clients would deploy their own models (FedRep), their personal ones."""

from __future__ import annotations

import json
from pathlib import Path

from fedjax_code.errors import UserError
from fedjax_code.experiments.answer import pass_with_ci
from fedjax_code.records import HumanEvalRecord, RoundRecord, RunSummary, read_json, read_jsonl

AXES = ("scale", "partition", "participation", "algorithm", "clients", "seed")
DATA_COLUMNS = ("unigram_entropy", "heterogeneity", "heterogeneity_floor", "label_distance", "tokens_sha256",
                "partition_sha256")  # from the run's rundir.DataProvenance


def _json(path: Path):
    return json.loads(Path(path).read_text())


def load_sweep(sweep_dir) -> dict:
    """The sweep.json of ``sweep_dir``."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (it has no sweep.json)")
    try:
        return _json(path)
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def round_records(cell_dir: Path) -> list[RoundRecord]:
    """The metrics.jsonl rows of a cell's run."""
    return read_jsonl(RoundRecord, Path(cell_dir) / "run" / "metrics.jsonl")


def _results(eval_dir: Path) -> list[dict]:
    """The results.jsonl rows of an evaluation directory (none when it has no such file)."""
    path = Path(eval_dir) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def before_results(root: Path) -> dict[str, list[dict]]:
    """source -> results of each pretrained model evaluated before fine-tuning (``sweep.evaluate_before``)."""
    out = {}
    for record in sorted((root / "before").glob("*/humaneval.json")):
        out[read_json(HumanEvalRecord, record).model or record.parent.name] = _results(record.parent)
    return out


def scale_axis(sweep: dict) -> dict:
    """The sweep's ``scale_axis`` (``key`` and ``label``; sweeps written before it scale ``model.scale``)."""
    return sweep.get("spec", {}).get("scale_axis") or {"key": "model.scale", "label": "scaling factor"}


def _blank(value):
    """A CSV cell: "" for a value a run does not have."""
    return "" if value is None else value


def _row(cell_dir: Path, cell: dict, target, trainable_size: bool = False) -> dict:
    """One finished cell's results. ``params`` is the trainable size when the scale axis is a LoRA rank (the
    base is the same in every cell), else the model's."""
    s = read_json(RunSummary, cell_dir / "run" / "summary.json")
    he = read_json(HumanEvalRecord, cell_dir / "humaneval" / "humaneval.json")
    m = s.model
    records = round_records(cell_dir)
    hits = [r.round for r in records if r.eval_loss is not None and r.eval_loss <= target]
    personal_hits = [r.round for r in records if r.personal_eval_loss is not None and r.personal_eval_loss <= target]
    personal = he.personal_client is not None  # the model a client deploys is its own: its figures stand for the run
    row = {"cell": cell["id"], **{a: cell["axes"].get(a) for a in AXES}}
    row.update({k: v for k, v in _flatten(s.config).items() if k not in row})
    results = _results(cell_dir / "humaneval")
    cis = {k: pass_with_ci(results, k, 1000) for k in (1, 10)}
    row.update({f"pass@{k}_ci": f"{got[1][0]:.3f}-{got[1][1]:.3f}" if got else "" for k, got in cis.items()})
    row.update({"params": m.get("params_trainable", m["params_total"]) if trainable_size else m["params_total"],
                "model_mb": m["size_mb"]["fp32"], "tokens_seen": s.tokens_seen,
                "train_flops": m["flops_per_token"] * s.tokens_seen,
                "evaluated_model": f"personal (client {he.personal_client})" if personal else "global",
                "final_eval_loss": s.personal_eval_loss if personal else s.eval_loss,
                "initial_eval_loss": _blank(s.initial_eval_loss),
                "client_eval_loss_worst10": (s.personal_client_eval_loss_worst10 if personal
                                             else s.client_eval_loss_worst10), "humaneval_nll": he.nll,
                "personal_humaneval_nll": _blank(he.personal_nll),
                "personal_eval_loss": _blank(s.personal_eval_loss),
                "personal_eval_loss_worst10": _blank(s.personal_client_eval_loss_worst10),
                "pass@1": he.pass_at_k.get("pass@1", ""), "pass@10": he.pass_at_k.get("pass@10", ""),
                "rounds_to_target": (personal_hits or [""])[0] if personal else (hits or [""])[0],
                "personal_rounds_to_target": (personal_hits or [""])[0],
                "train_tokens_per_s": s.train_tokens_per_s,
                "decode_tokens_per_s": he.decode_tokens_per_s, "comm_mb": s.comm_mb,
                "personal_decode_tokens_per_s": _blank(he.personal_decode_tokens_per_s),
                **{k: s.data[k] for k in DATA_COLUMNS}})
    return row


def scan(root: Path, sweep: dict) -> tuple[list[tuple[dict, Path]], list[dict]]:
    """([(row, cell dir)] of finished cells, [{id, status, error}] of the others), in grid order."""
    target = sweep["spec"]["report"]["target_loss"]
    trainable_size = scale_axis(sweep)["key"] == "model.lora_rank"
    done, missing = [], []
    for cell in sweep.get("cells", []):
        cell_dir = root / "cells" / cell["id"]
        try:
            info = _json(cell_dir / "cell.json") if (cell_dir / "cell.json").is_file() else {"status": "not started"}
        except ValueError:
            info = {"status": "unreadable", "error": "its cell.json is not valid JSON"}
        status, error = info.get("status", "unknown"), info.get("error")
        outputs = all((cell_dir / p).is_file() for p in ("run/summary.json", "humaneval/humaneval.json"))
        if status == "done" and not outputs:
            status, error = "incomplete", "cell.json says done but summary.json or humaneval.json is missing"
        elif status == "done":
            try:
                done.append(({**_row(cell_dir, cell, target, trainable_size), "lr_tuned": info.get("lr_tuned", False)}, cell_dir))
                continue
            except (KeyError, TypeError, ValueError) as err:
                status, error = "unreadable", f"its summary.json or humaneval.json could not be read ({err!r})"
        missing.append({"id": cell["id"], "status": status, "error": error})
    return done, missing


def results_rows(sweep_dir) -> list[dict]:
    """One dict per finished cell: id, axes, flattened config and metrics: the columns of results.csv but the
    paired differences between scales, which ``report.write_report`` adds (``answer.PAIRED_COLUMNS``)."""
    return [row for row, _ in scan(Path(sweep_dir), load_sweep(sweep_dir))[0]]
