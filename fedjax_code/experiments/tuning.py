"""Per-scale learning-rate tuning: scales are compared each at its own best client learning rate.

A size comparison at one shared rate ranks the rate, not the size: the best rate falls as models grow.
With a ``[tune]`` section the sweep first runs, for every tuning group (the cell axes but partition and
seed: scale, participation, algorithm, clients), one short trial per candidate ``client_lr`` on the
``tune.partition`` partition at seed 0, each spending ``tune.fraction`` of the cell's budget. The rate
with the lowest final held-out loss (a diverged trial counts as infinite) is then used by every cell of
that group, whatever its partition or seed, so IID and non-IID cells of a scale share one rate.

Trials are train runs under ``tune/<trial id>/`` that a rerun skips or resumes like cells;
``tune/chosen.json`` records every trial's loss and the chosen rate per group.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedjax_code.config import TuneConfig, build_section
from fedjax_code.errors import UserError
from fedjax_code.experiments.run import train
from fedjax_code.records import write_json

GROUP_AXES = ("scale", "participation", "algorithm", "clients")


def tune_config(spec: dict) -> TuneConfig:
    return build_section(TuneConfig, "tune", spec["tune"])


def group_key(axes: dict) -> str:
    """The tuning group of a cell: its axes but partition and seed."""
    return "_".join(f"{a}={axes[a]:g}" if isinstance(axes[a], float) else f"{a}={axes[a]}" for a in GROUP_AXES)


def trials(spec: dict, grid: list[dict]) -> list[dict]:
    """``{"id", "group", "axes", "client_lr"}`` of every trial, in grid order."""
    tune, out, seen = tune_config(spec), [], set()
    for cell in grid:
        key = group_key(cell["axes"])
        if key in seen:
            continue
        seen.add(key)
        axes = {**cell["axes"], "partition": tune.partition, "seed": 0}
        out += [{"id": f"{key}_lr={lr:g}", "group": key, "axes": axes, "client_lr": lr} for lr in tune.client_lr]
    return out


def _trial_loss(config, run_dir: Path, progress: bool) -> float:
    try:
        return train(config, run_dir, resume=True, progress=progress).eval_loss
    except UserError as err:
        if "diverged" not in str(err):
            raise
        return float("inf")


def run_tuning(spec: dict, out: Path, grid: list[dict], configure, progress: bool, log) -> dict[str, float]:
    """Run (or reuse) every trial and return the chosen client_lr per tuning group.

    ``configure(axes, client_lr, fraction)`` gives a trial's ExperimentConfig (``sweep.cell_config``).
    """
    tune, results = tune_config(spec), {}
    for i, trial in enumerate(todo := trials(spec, grid), 1):
        log(f"[tune {i}/{len(todo)}] {trial['id']}")
        config = configure(trial["axes"], trial["client_lr"], tune.fraction)
        loss = _trial_loss(config, out / "tune" / trial["id"] / "run", progress)
        results.setdefault(trial["group"], {})[f"{trial['client_lr']:g}"] = loss
    chosen = {group: {"client_lr": float(min(losses, key=losses.get)),
                      "trials": {lr: loss if math.isfinite(loss) else None for lr, loss in losses.items()}}
              for group, losses in results.items()}
    write_json(out / "tune" / "chosen.json", chosen)
    return {group: c["client_lr"] for group, c in chosen.items()}


def read_chosen(sweep_dir: Path) -> dict:
    """tune/chosen.json of a sweep directory, or {} when the sweep was not tuned."""
    path = Path(sweep_dir) / "tune" / "chosen.json"
    return json.loads(path.read_text()) if path.is_file() else {}
