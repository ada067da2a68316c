"""The records fedjax-code writes and reads back, one dataclass each, shared by every writer and reader.

``RoundRecord`` is a line of ``metrics.jsonl``, ``RunSummary`` a run's ``summary.json`` and
``HumanEvalRecord`` an evaluation's ``humaneval.json``. Reading checks the fields against the dataclass,
so a renamed or missing field fails loudly instead of going missing from a plot. ``write_atomic`` is the
one way a file is replaced: a temporary file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

R = TypeVar("R")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """``obj`` (a dict or a record) as indented JSON, atomically."""
    write_atomic(path, json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, indent=1) + "\n")


def to_dict(record) -> dict:
    """The record's fields, leaving out optional fields that are None."""
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


def from_dict(cls: type[R], data: dict, source: str = "a record") -> R:
    """``cls(**data)``, or a ValueError naming the unknown or missing fields."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING}
    unknown, missing = sorted(set(data) - set(fields)), sorted(required - set(data))
    if unknown or missing:
        raise ValueError(f"{source} does not match {cls.__name__}: unknown fields {unknown}, missing fields {missing}")
    return cls(**data)


def read_json(cls: type[R], path: Path) -> R:
    return from_dict(cls, json.loads(Path(path).read_text()), str(path))


def read_jsonl(cls: type[R], path: Path) -> list[R]:
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
    return [from_dict(cls, json.loads(line), f"{path} line {i}") for i, line in enumerate(lines, 1) if line.strip()]


@dataclass(frozen=True)
class RoundRecord:
    """One round of ``fedjax-code train`` (a line of metrics.jsonl); the eval fields only at eval rounds."""

    round: int
    train_loss: float
    tokens: int              # training tokens of this round (participants' active steps x B x T)
    tokens_seen: int         # cumulative
    wall_s: float
    tokens_per_s: float
    includes_compile: bool   # the first round of a process
    bytes_up: int            # what a deployment would send (see federated.algorithms.registry)
    bytes_down: int
    participants: int
    mean_tau: float          # local steps, averaged over participants
    eval_loss: float | None = None                 # all clients' held-out splits, weighted by held-out tokens
    client_eval_loss_mean: float | None = None
    client_eval_loss_worst10: float | None = None  # mean of the worst 10% of clients: the fairness view
    client_eval_loss_std: float | None = None
    personal_eval_loss: float | None = None        # the same four, of each client's personal model on its own
    personal_client_eval_loss_mean: float | None = None  # held-out split (personalised algorithms only)
    personal_client_eval_loss_worst10: float | None = None
    personal_client_eval_loss_std: float | None = None
    messenger_scale: float | None = None  # messengers: the messenger's ladder factor this round (it may grow)


@dataclass(frozen=True)
class RunSummary:
    """A finished run (summary.json); its presence marks the run as finished."""

    rounds: int
    final_train_loss: float
    eval_loss: float
    client_eval_loss_mean: float
    client_eval_loss_worst10: float
    client_eval_loss_std: float
    tokens_seen: int
    train_wall_s: float
    train_tokens_per_s: float  # excluding rounds that include compilation
    comm_mb: float
    num_clients: int
    devices: int
    model: dict                # models.model_info of the trained model
    config: dict               # the run's TOML-shaped config
    data: dict                 # rundir.DataProvenance of the data it trained on
    initial_eval_loss: float | None = None  # held-out loss before round 1 (a pretrained model's own)
    personal_eval_loss: float | None = None  # personalised algorithms: the personal models' (see RoundRecord)
    personal_client_eval_loss_mean: float | None = None
    personal_client_eval_loss_worst10: float | None = None
    personal_client_eval_loss_std: float | None = None


@dataclass(frozen=True)
class HumanEvalRecord:
    """An evaluation (humaneval.json): scoring fields always, sampling fields when the samples were generated."""

    pass_at_k: dict            # {"pass@1": ..., "pass@10": ...} for every k <= n
    samples: int
    passed: int
    executions_per_s: float
    timeout: float
    isolation: dict            # what the sandbox achieved (eval.execute)
    samples_file: str | None = None  # `eval score`: the file scored
    run: str | None = None     # `eval humaneval`: the run and round sampled, and how
    round: int | None = None
    model: str | None = None   # `eval humaneval --model`: the pretrained source sampled
    personal_client: int | None = None  # set when pass@k, nll and decoding are this client's personal model's
    #                                   # (its algorithm's server model is not deployable: FedRep's)
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    problems: int | None = None
    generated_tokens: int | None = None
    decode_s: float | None = None
    decode_tokens_per_s: float | None = None  # generated tokens / seconds of the decode steps that compiled nothing
    prefill_s: float | None = None       # prompts prefilled (once each)
    slots: int | None = None             # decode slots (models.decode)
    slot_use: float | None = None        # the share of slot-steps that generated a token
    nll: float | None = None             # mean canonical-solution NLL (nats per token)
    nll_problems: int | None = None
    nll_per_task: dict | None = None
    personal_nll: float | None = None    # personalised runs: the mean NLL of some clients' personal models
    personal_nll_clients: list | None = None  # (``nll`` is the evaluated model's: see ``personal_client``)
    personal_decode_tokens_per_s: float | None = None  # a personal model's, where it is built differently from the
    #                                                 # evaluated model (the messengers' private models)
