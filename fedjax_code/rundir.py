"""A run directory stands on its own: evaluating or exporting a run never rebuilds its data.

    config.json     {"config": the TOML-shaped ExperimentConfig, "data": DataProvenance}
    tokenizer/      the tokenizer the run trained with (AutoTokenizer loads it)
    metrics.jsonl   one records.RoundRecord per round
    checkpoints/    orbax checkpoints of the whole simulation state
    summary.json    records.RunSummary, written when the run finishes

``load_trained`` needs only these files. ``train --resume`` compares the hashes of the data it is about
to train on with the ones recorded here (``check_same_data``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax

from fedjax_code.checkpoint import Checkpointer
from fedjax_code.config import ExperimentConfig, experiment_from_dict
from fedjax_code.data.tokenizer import load_tokenizer
from fedjax_code.errors import UserError
from fedjax_code.federated import build_algorithm
from fedjax_code.models import get_preset, init_params, loss_fn, scale
from fedjax_code.records import from_dict, write_json


@dataclass(frozen=True)
class DataProvenance:
    """What a run trained on, by content, and how it is spread (from the partition's JSON)."""

    tokens_sha256: str     # the prepared token stream's bytes (also in the data's stats.json)
    partition_sha256: str  # the client of every example
    num_clients: int
    vocab_size: int
    unigram_entropy: float      # nats, of the pooled training tokens: the loss of a context-free model
    heterogeneity: float        # mean JS distance of client token unigrams from the pooled ones
    heterogeneity_floor: float  # the same for random splits of the same sizes
    label_distance: float       # mean TV distance of client topic mixes from the global mix


def state(run_dir: Path) -> str:
    """'empty', 'finished' (summary.json) or 'unfinished' (anything else)."""
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "empty"
    return "finished" if (run_dir / "summary.json").is_file() else "unfinished"


def write_config(run_dir: Path, cfg: ExperimentConfig, data: DataProvenance) -> None:
    write_json(Path(run_dir) / "config.json", {"config": cfg.to_dict(), "data": dataclasses.asdict(data)})


def read_config(run_dir: Path) -> tuple[ExperimentConfig, DataProvenance]:
    """The config and data provenance of a run directory, or one sentence saying why not."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no config.json)")
    try:
        doc = json.loads(path.read_text())
        return experiment_from_dict(doc["config"]), from_dict(DataProvenance, doc["data"], str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a fedjax-code run config ({err}); "
                        "was it written by an older version?") from None


def check_same_data(run_dir: Path, recorded: DataProvenance, current: DataProvenance) -> None:
    """Refuse to go on training ``run_dir`` on data other than the data it started with."""
    if (recorded.tokens_sha256, recorded.partition_sha256) != (current.tokens_sha256, current.partition_sha256):
        raise UserError(
            f"{run_dir} was trained on tokens {recorded.tokens_sha256} with partition {recorded.partition_sha256}, "
            f"but the data prepared now is tokens {current.tokens_sha256} with partition {current.partition_sha256}; "
            "restore the original data (the same source and configuration) or start a new run with --force")


def save_tokenizer(run_dir: Path, tokenizer_dir: Path) -> None:
    target = Path(run_dir) / "tokenizer"
    if not target.is_dir():
        shutil.copytree(tokenizer_dir, target)


def model_config(cfg: ExperimentConfig, vocab_size: int):
    """The base preset scaled by ``model.scale``, with the tokenizer's vocabulary, the run's dtype and, when
    set, its ``model.tie_embeddings``."""
    try:
        base = get_preset(cfg.model.base)
    except ValueError as err:
        raise UserError(str(err)) from None
    scaled = scale(base, cfg.model.scale)
    tie = scaled.tie_embeddings if cfg.model.tie_embeddings is None else cfg.model.tie_embeddings
    return dataclasses.replace(scaled, vocab_size=vocab_size, dtype=cfg.model.dtype, tie_embeddings=tie,
                               max_len=max(scaled.max_len, cfg.federated.seq_len))


class TrainedModel(NamedTuple):
    config: ExperimentConfig
    model: object        # models.ModelConfig
    params: dict         # the global model's parameters
    tokenizer: object
    round: int


def load_trained(run_dir: Path, checkpoint: Path | None = None) -> TrainedModel:
    """The global model of a run's latest checkpoint, or of ``checkpoint`` (a step directory such as
    ``RUN/checkpoints/10``), with the run's own tokenizer; reads nothing outside the run directory."""
    run_dir = Path(run_dir)
    cfg, data = read_config(run_dir)
    ckpt = Checkpointer(Path(checkpoint).parent if checkpoint else run_dir / "checkpoints")
    round_ = int(Path(checkpoint).name) if checkpoint and Path(checkpoint).name.isdigit() else ckpt.latest_round()
    if round_ is None or round_ not in ckpt.all_rounds():
        where = f"at {checkpoint}" if checkpoint else f"in {run_dir / 'checkpoints'}"
        raise UserError(f"no checkpoint {where}")
    model = model_config(cfg, data.vocab_size)
    algorithm = build_algorithm(cfg.federated, lambda p, b: loss_fn(p, model, b))
    server, clients = algorithm.init(init_params(model, jax.random.PRNGKey(cfg.seed)), data.num_clients)
    server, _, _ = ckpt.restore(round_, server, clients)
    ckpt.close()
    return TrainedModel(cfg, model, server.params, load_tokenizer(run_dir / "tokenizer"), round_)
