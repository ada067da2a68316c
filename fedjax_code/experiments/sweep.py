"""``fedjax-code sweep``: a grid of federated runs, each trained then evaluated on HumanEval.

A sweep spec (a preset in ``presets/`` or a TOML file) names the grid axes, a per-cell budget
(rounds, tokens or training FLOPs), the HumanEval settings, a base train config and optional
``[per_algorithm.NAME]`` federated keys (say, FedAdam's server_lr). The sweep
directory it writes::

    sweep.json                 the resolved spec and the list of cells (grid order)
    cells/<id>/cell.json       the cell's axes and status: training | evaluating | done | failed (+ error)
    cells/<id>/run/            a `fedjax-code train` run directory (checkpoints, metrics, summary)
    cells/<id>/humaneval/      a `fedjax-code eval humaneval` directory
    cells/<id>/error.txt       the traceback of a failed cell

A rerun skips finished cells, resumes interrupted ones from their checkpoints and (unless
``retry_failed``) leaves failed cells as they are; a different spec is refused unless ``force``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import re
import shutil
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path

from fedjax_code.config import (EvalConfig, ExperimentConfig, ReportConfig, TuneConfig, apply_overrides,
                                build_section, experiment_from_dict)
from fedjax_code.data.prepare import prepare, read_stats
from fedjax_code.errors import UserError
from fedjax_code.eval.humaneval import evaluate_model, evaluate_run
from fedjax_code.experiments.components import model_config
from fedjax_code.experiments.run import train
from fedjax_code.experiments.tuning import group_key, run_tuning
from fedjax_code.federated import cohort_size
from fedjax_code.models import ModelConfig, flops_per_token, param_count
from fedjax_code.records import write_json

PRESET_DIR = Path(__file__).parent / "presets"
AXES = ("scale", "partition", "participation", "algorithm", "clients", "seed")
BUDGETS = ("rounds", "tokens", "flops")
SPEC_KEYS = {"name", "description", "grid", "budget", "eval", "report", "tune", "base", "per_algorithm", "scale_axis",
             "architectures"}
# What the grid's scale values set, and the prefix of their value in a cell id.
SCALE_KEYS = {"model.scale": "x", "model.lora_rank": "r", "model.pretrained": "m"}
SCALE_LABELS = {"model.scale": "scaling factor", "model.lora_rank": "LoRA rank",
                "model.pretrained": "pretrained model (params, millions)"}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except OSError:
        raise UserError(f"cannot read sweep config {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"sweep config {path} is not valid TOML ({err})") from None


def load_spec(name_or_path: str, overrides: list[str] = ()) -> dict:
    """A preset name or TOML path, with ``section.key=value`` overrides, validated and filled with defaults."""
    path = Path(name_or_path)
    if not path.is_file():
        if name_or_path not in presets():
            raise UserError(f"{name_or_path!r} is neither a sweep config file nor a preset ({', '.join(presets())})")
        path = PRESET_DIR / f"{name_or_path}.toml"
    spec = apply_overrides(_read_toml(path), list(overrides), max_depth=3)
    spec.setdefault("name", path.stem)
    return validate_spec(spec)


def validate_spec(spec: dict) -> dict:
    """Check every section and every cell's train config; returns the spec with defaults filled in."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UserError(f"unknown sweep key {unknown[0]!r} (known: {', '.join(sorted(SPEC_KEYS))})")
    grid = spec.get("grid", {})
    unknown = sorted(set(grid) - set(AXES))
    if unknown:
        raise UserError(f"unknown grid axis {unknown[0]!r} (axes: {', '.join(AXES)})")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values or len(set(map(str, values))) != len(values):
            raise UserError(f"grid.{axis} must be a non-empty list of distinct values, not {values!r}")
    budget = spec.get("budget", {"kind": "rounds", "value": 20})
    if set(budget) != {"kind", "value"} or budget["kind"] not in BUDGETS:
        raise UserError(f"budget must have kind (one of {', '.join(BUDGETS)}) and value, not {budget!r}")
    if not isinstance(budget["value"], (int, float)) or budget["value"] <= 0:
        raise UserError(f"budget.value must be a positive number, not {budget['value']!r}")
    spec = {**spec, "description": spec.get("description", ""), "grid": grid, "budget": budget,
            "eval": _as_dict(build_section(EvalConfig, "eval", spec.get("eval", {}))),
            "report": _as_dict(build_section(ReportConfig, "report", spec.get("report", {}))),
            "tune": _as_dict(build_section(TuneConfig, "tune", spec.get("tune", {}))),
            "base": spec.get("base", {}), "per_algorithm": spec.get("per_algorithm", {}),
            "scale_axis": _scale_axis(spec.get("scale_axis", {}), grid.get("scale", [])),
            "architectures": _architectures(spec.get("architectures", {}))}
    partition_keys(spec["tune"]["partition"])
    for cell in cells(spec):
        cell_config(spec, cell["axes"], vocab_size=None)  # validates every cell before anything runs
    return spec


def _scale_axis(axis: dict, scales: list) -> dict:
    """The spec's ``[scale_axis]``: ``key`` (one of SCALE_KEYS; default model.scale), ``label`` for reports and,
    for ``model.pretrained``, ``models``: the source (anything ``load_pretrained`` takes) of each scale value,
    the model's parameters in millions."""
    unknown = sorted(set(axis) - {"key", "label", "models"})
    if unknown:
        raise UserError(f"unknown scale_axis key {unknown[0]!r} (known: key, label, models)")
    key = axis.get("key", "model.scale")
    if key not in SCALE_KEYS:
        raise UserError(f"scale_axis.key must be one of {', '.join(SCALE_KEYS)}, not {key!r}")
    models = axis.get("models", {})
    if key == "model.pretrained":
        for value in scales:
            if not isinstance(models.get(f"{value:g}" if isinstance(value, (int, float)) else None), str):
                raise UserError(f"grid.scale {value!r} needs scale_axis.models.{value}, the source of the model "
                                "(its parameters in millions name it)")
    return {"key": key, "label": axis.get("label", SCALE_LABELS[key]), "models": models}


def _architectures(archs: dict) -> dict:
    """``[architectures]``: the ModelConfig fields of each pretrained source the cells use, so that the spec alone
    gives their sizes and FLOPs (``dry_run``) without loading weights."""
    for source, arch in archs.items():
        if not isinstance(arch, dict):
            raise UserError(f"architectures.{source!r} must be a table of ModelConfig fields")
        try:
            ModelConfig(**arch)
        except TypeError as err:
            raise UserError(f"architectures.{source!r} is not a model architecture ({err})") from None
    return archs


def _as_dict(section) -> dict:
    """A validated section as the JSON-shaped dict the spec keeps (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(section)))


def partition_keys(label: str) -> dict:
    """``iid`` / ``dirichlet-0.5`` / ``pathological-2`` / ``size-1.0`` / ``natural`` -> the data.* keys."""
    scheme, _, arg = str(label).partition("-")
    keys = {"scheme": scheme}
    if arg:
        try:
            value = float(arg)
        except ValueError:
            raise UserError(f"partition {label!r} must look like scheme or scheme-number, e.g. dirichlet-0.5") from None
        if scheme == "pathological":
            keys["groups_per_client"] = int(value)
        elif scheme in ("dirichlet", "size"):
            keys["alpha"] = value
        else:
            raise UserError(f"partition {label!r}: only dirichlet, size and pathological take a number")
    return keys


def cells(spec: dict) -> list[dict]:
    """Every grid cell in order: ``{"id", "axes"}``; an axis not in the grid takes the base config's value."""
    base = experiment_from_dict(spec["base"])
    defaults = {"scale": base.model.scale, "partition": base.partition.scheme, "participation":
                base.federated.participation, "algorithm": base.federated.algorithm,
                "clients": base.partition.clients, "seed": base.seed}
    if defaults["partition"] in ("dirichlet", "size"):
        defaults["partition"] += f"-{base.partition.alpha:g}"
    values = [spec["grid"].get(axis, [defaults[axis]]) for axis in AXES]
    prefix = SCALE_KEYS[spec.get("scale_axis", {}).get("key", "model.scale")]
    out = []
    for combo in itertools.product(*values):
        axes = dict(zip(AXES, combo))
        cell_id = (f"{axes['partition']}_p{axes['participation']:g}_{axes['algorithm']}_k{axes['clients']}"
                   f"_{prefix}{axes['scale']:g}_seed{axes['seed']}")
        out.append({"id": cell_id, "axes": axes})
    return out


def cell_config(spec: dict, axes: dict, vocab_size: int | None, client_lr: float | None = None,
                budget_fraction: float = 1.0) -> ExperimentConfig:
    """The train config of one cell: the base, the cell's axes and the budget turned into rounds.

    With ``vocab_size=None`` (before the data exists) the base's ``data.vocab_size`` stands in.
    ``client_lr`` (a tuned rate) and ``budget_fraction`` (a tuning trial's share) override the spec's.
    """
    d = json.loads(json.dumps(spec["base"]))
    d["seed"] = axes["seed"]
    d.setdefault("data", {}).update(clients=axes["clients"], **partition_keys(axes["partition"]))
    key, scale = spec["scale_axis"]["key"], axes["scale"]
    if key == "model.pretrained":
        scale = spec["scale_axis"]["models"][f"{scale:g}"]
    d.setdefault("model", {})[key.split(".")[1]] = int(scale) if key == "model.lora_rank" else scale
    d.setdefault("federated", {}).update(participation=axes["participation"], algorithm=axes["algorithm"])
    d["federated"].update(spec["per_algorithm"].get(axes["algorithm"], {}))
    if client_lr is not None:
        d["federated"]["client_lr"] = client_lr
    cfg = experiment_from_dict(d)
    budget = {**spec["budget"], "value": spec["budget"]["value"] * budget_fraction}
    model = cell_model(spec, cfg, vocab_size) if budget["kind"] == "flops" else None
    d["federated"]["rounds"] = budget_rounds(budget, cfg, model)
    return experiment_from_dict(d)


def cell_model(spec: dict, cfg: ExperimentConfig, vocab_size: int | None) -> ModelConfig:
    """A cell's ModelConfig without loading any weights: a pretrained model's from the architecture the spec
    records, else the scaled preset's (with ``vocab_size``, or the base's ``data.vocab_size`` before the data
    exists)."""
    if cfg.model.pretrained:
        arch = spec["architectures"].get(cfg.model.pretrained)
        if arch is None:
            raise UserError(f"the spec records no architecture for the pretrained model {cfg.model.pretrained!r}; "
                            f"add its ModelConfig fields as [architectures.\"{cfg.model.pretrained}\"]")
        return model_config(cfg, 0, ModelConfig(**arch))
    return model_config(cfg, vocab_size or cfg.data.vocab_size)


def budget_rounds(budget: dict, cfg: ExperimentConfig, model: ModelConfig | None) -> int:
    """Rounds that spend the budget: itself, or tokens (or training FLOPs of ``model``) over what one round
    consumes."""
    if budget["kind"] == "rounds":
        return max(1, int(budget["value"]))
    tokens = budget["value"]
    if budget["kind"] == "flops":
        tokens /= flops_per_token(model, cfg.federated.seq_len)
    return max(1, round(tokens / tokens_per_round(cfg)))


def tokens_per_round(cfg: ExperimentConfig) -> int:
    f = cfg.federated
    return cohort_size(cfg.partition.clients, f.participation) * f.local_steps * f.batch_size * f.seq_len


def dry_run(spec: dict) -> list[dict]:
    """Every cell's parameters, rounds, training tokens and estimated training FLOPs (``flops_per_token``, the
    forward and backward passes of the whole model), from the spec alone: no data, no weights, no network."""
    out = []
    for cell in cells(spec):
        cfg = cell_config(spec, cell["axes"], vocab_size=None)
        model = cell_model(spec, cfg, None)
        counts = param_count(model)
        tokens = cfg.federated.rounds * tokens_per_round(cfg)
        out.append({"id": cell["id"], **cell["axes"], "model": cfg.model.pretrained or cfg.model.base,
                    "params": counts["params_total"], "params_trainable": counts["params_trainable"],
                    "rounds": cfg.federated.rounds, "tokens": tokens,
                    "train_flops": flops_per_token(model, cfg.federated.seq_len) * tokens})
    return out


@dataclass
class CellOutcome:
    id: str
    status: str
    error: str | None = None


def extends(saved: dict, spec: dict) -> bool:
    """Whether ``spec`` keeps every finished cell of ``saved`` valid: the same settings but for the report's and
    more grid values (another seed, say), so that its cells include every saved cell."""
    rest = lambda s: {k: v for k, v in s.items() if k not in ("grid", "report")}  # noqa: E731
    new = {c["id"]: c["axes"] for c in cells(spec)}
    return rest(saved) == rest(spec) and all(new.get(c["id"]) == c["axes"] for c in cells(saved))


def _open_sweep_dir(out: Path, spec: dict, force: bool) -> None:
    marker = out / "sweep.json"
    if marker.is_file():
        saved, spec = json.loads(marker.read_text())["spec"], json.loads(json.dumps(spec))
        if saved == spec and not force:
            return
        if not force and not extends(saved, spec):
            raise UserError(f"{out} holds a sweep with another spec; pass --force to overwrite it, choose "
                            "another --out, or change only grid values (adding a seed, a scale) or report settings")
        if force:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty and holds no sweep; choose another --out or pass --force")
    elif out.exists() and force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"name": spec["name"], "description": spec["description"], "spec": spec,
                         "cells": cells(spec)})


def _cell_status(cell_dir: Path) -> str | None:
    path = cell_dir / "cell.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def run_cell(spec: dict, cell: dict, cell_dir: Path, vocab_size: int, progress: bool,
             client_lr: float | None = None) -> None:
    """Train (resuming any checkpoint) and evaluate one cell, keeping cell.json's status current."""
    cfg = cell_config(spec, cell["axes"], vocab_size, client_lr)
    record = {**cell, "status": "training", "error": None, "rounds": cfg.federated.rounds,
              "client_lr": cfg.federated.client_lr, "lr_tuned": client_lr is not None}
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json(cell_dir / "cell.json", record)
    began = time.perf_counter()
    train(cfg, cell_dir / "run", resume=True, progress=progress)
    record.update(status="evaluating", train_s=round(time.perf_counter() - began, 2))
    write_json(cell_dir / "cell.json", record)
    began = time.perf_counter()
    if not (cell_dir / "humaneval" / "humaneval.json").is_file():  # an interrupted evaluation resumes its batches
        evaluate_run(cell_dir / "run", cell_dir / "humaneval", build_section(EvalConfig, "eval", spec["eval"]),
                     progress=progress)
    record.update(status="done", eval_s=round(time.perf_counter() - began, 2))
    write_json(cell_dir / "cell.json", record)


def pretrained_sources(spec: dict) -> list[str]:
    """The pretrained models the sweep's cells start from, in grid order (none when they train from scratch)."""
    found = [cell_config(spec, c["axes"], None).model.pretrained for c in cells(spec)]
    return list(dict.fromkeys(s for s in found if s))


def before_dir(out: Path, source: str) -> Path:
    """Where the sweep keeps the HumanEval evaluation of a pretrained model before fine-tuning."""
    return Path(out) / "before" / re.sub(r"[^\w.-]+", "_", source).strip("_")


def evaluate_before(spec: dict, sources: list[str], out: Path, progress: bool, log=print) -> None:
    """HumanEval of each pretrained model before any fine-tuning, with the cells' eval settings: the baseline
    the report sets beside every cell (resumed like a cell's evaluation; kept once finished)."""
    for source in sources:
        target = before_dir(out, source)
        if (target / "humaneval.json").is_file():
            continue
        log(f"before fine-tuning: evaluating {source}")
        evaluate_model(source, target, build_section(EvalConfig, "eval", spec["eval"]), progress=progress)


def _record_failure(cell: dict, cell_dir: Path, err: Exception) -> str:
    message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    (cell_dir / "error.txt").write_text("".join(traceback.format_exception(err)))
    record = json.loads((cell_dir / "cell.json").read_text()) if (cell_dir / "cell.json").is_file() else dict(cell)
    record.update(status="failed", error=message)
    write_json(cell_dir / "cell.json", record)
    return message


def run_sweep(spec: dict, out: Path, force: bool = False, retry_failed: bool = False, progress: bool = True,
              log=print, only: str | None = None) -> list[CellOutcome]:
    """Run every cell of ``spec`` into ``out``, or only those whose id matches the glob ``only`` (a share of the
    grid: a seed, a partition, one machine's part); returns each run cell's outcome (done, skipped, failed)."""
    out = Path(out)
    grid = [c for c in cells(spec) if only is None or fnmatch.fnmatchcase(c["id"], only)]
    if not grid:
        raise UserError(f"--only {only!r} matches no cell of the sweep (see --dry-run for the cell ids)")
    _open_sweep_dir(out, spec, force)
    sources = pretrained_sources(spec)
    if sources:  # each cell tokenises its data with its model's tokenizer (when it trains)
        vocab_size = None
        evaluate_before(spec, sources, out, progress, log)
    else:
        vocab_size = read_stats(prepare(experiment_from_dict(spec["base"]).data, progress=progress))["vocab_size"]
    tuned = {}
    if spec["tune"]["client_lr"]:
        configure = lambda axes, lr, fraction: cell_config(spec, axes, vocab_size, lr, fraction)  # noqa: E731
        tuned = run_tuning(spec, out, grid, configure, progress, log)
    outcomes = []
    for i, cell in enumerate(grid, 1):
        cell_dir = out / "cells" / cell["id"]
        status = _cell_status(cell_dir)
        if status == "done" or (status == "failed" and not retry_failed):
            outcomes.append(CellOutcome(cell["id"], "skipped" if status == "done" else "failed (kept)"))
            log(f"[{i}/{len(grid)}] {cell['id']}: {status}, skipped")
            continue
        log(f"[{i}/{len(grid)}] {cell['id']}: {'resuming' if status else 'starting'}")
        try:
            run_cell(spec, cell, cell_dir, vocab_size, progress, tuned.get(group_key(cell["axes"])))
            outcomes.append(CellOutcome(cell["id"], "done"))
        except Exception as err:  # noqa: BLE001 - a failed cell is recorded and the sweep goes on
            message = _record_failure(cell, cell_dir, err)
            outcomes.append(CellOutcome(cell["id"], "failed", message))
            log(f"[{i}/{len(grid)}] {cell['id']}: failed: {message}")
    return outcomes
