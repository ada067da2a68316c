"""A run directory stands on its own: evaluating or exporting a run never rebuilds its data.

    config.json     {"config": the TOML-shaped ExperimentConfig, "data": DataProvenance,
                     "base": {"source", "sha256"} of the frozen base when LoRA adapters are trained on it}
    tokenizer/      the tokenizer the run trained with (AutoTokenizer loads it)
    metrics.jsonl   one records.RoundRecord per round
    checkpoints/    orbax checkpoints of the whole simulation state
    summary.json    records.RunSummary, written when the run finishes

``load_trained`` needs only these files, and the base's source for a LoRA run (checked by its hash; the
checkpoints hold the adapters, never copies of the base). ``train --resume`` compares the hashes of the data
it is about to train on with the ones recorded here (``check_same_data``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_code.checkpoint import Checkpointer
from fedjax_code.config import ExperimentConfig, experiment_from_dict
from fedjax_code.data.tokenizer import load_tokenizer
from fedjax_code.errors import UserError
from fedjax_code.federated import ClientStore, Models, algorithm_spec, build_algorithm, with_fresh
from fedjax_code.models import init_params, loss_fn, lora
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


def write_config(run_dir: Path, cfg: ExperimentConfig, data: DataProvenance, base: dict | None = None) -> None:
    doc = {"config": cfg.to_dict(), "data": dataclasses.asdict(data)}
    write_json(Path(run_dir) / "config.json", doc | ({"base": base} if base else {}))


def check_same_base(run_dir: Path, sha256: str) -> None:
    """Refuse a frozen base other than the one ``run_dir``'s adapters were trained on."""
    path = Path(run_dir) / "config.json"
    recorded = json.loads(path.read_text()).get("base") if path.is_file() else None
    if recorded and recorded["sha256"] != sha256:
        raise UserError(f"{run_dir} trained adapters on the base {recorded['source']!r} with hash {recorded['sha256']}, "
                        f"but that source now gives hash {sha256}; restore the original weights")


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


class TrainedModel(NamedTuple):
    config: ExperimentConfig
    model: object        # models.ModelConfig
    params: dict         # the global model's parameters (LoRA adapters merged into the base)
    tokenizer: object
    round: int
    trainable: dict      # what the run trained: the adapters of a LoRA run, else ``params``


def _checkpoint(run_dir: Path, checkpoint: Path | None) -> tuple[Checkpointer, int]:
    """The run's checkpoints and the round to read: ``checkpoint``'s (a step directory) or the latest."""
    ckpt = Checkpointer(Path(checkpoint).parent if checkpoint else run_dir / "checkpoints")
    round_ = int(Path(checkpoint).name) if checkpoint and Path(checkpoint).name.isdigit() else ckpt.latest_round()
    if round_ is None or round_ not in ckpt.all_rounds():
        where = f"at {checkpoint}" if checkpoint else f"in {run_dir / 'checkpoints'}"
        raise UserError(f"no checkpoint {where}")
    return ckpt, round_


def _setup(run_dir: Path, cfg: ExperimentConfig, data: DataProvenance):
    """The run's model (``components.RunModel``), checked against the base it trained on."""
    from fedjax_code.experiments import components

    setup = components.run_model(cfg, data.vocab_size, components.pretrained(cfg))
    if setup.base:
        check_same_base(run_dir, components.params_sha256(setup.base))
    return setup


def _server(cfg: ExperimentConfig, data: DataProvenance, setup, ckpt: Checkpointer, round_: int):
    """(the server state at ``round_``, the config of the server's model: the run's, or the messenger at its size
    then)."""
    if algorithm_spec(cfg.federated.algorithm).needs_models:
        from fedjax_code.experiments.messenger import messenger_config

        model = messenger_config(cfg, data.vocab_size, ckpt.meta(round_)["messenger_scale"])
        algorithm = build_algorithm(cfg.federated, None, models=Models(None, None, None, cfg.seed))
        template = init_params(model, jax.random.PRNGKey(0))
    else:
        model, template = setup.config, setup.trainable
        algorithm = build_algorithm(cfg.federated, lambda p, b: loss_fn(p, setup.config, b))
    return ckpt.restore(round_, algorithm.init_server(template, data.num_clients))[0], model


def load_trained(run_dir: Path, checkpoint: Path | None = None) -> TrainedModel:
    """The global model (or messenger) of a run's latest checkpoint, or of ``checkpoint`` (a step directory such
    as ``RUN/checkpoints/10``), with the run's own tokenizer; reads nothing outside the run directory but the
    pretrained model a run started from."""
    run_dir = Path(run_dir)
    cfg, data = read_config(run_dir)
    ckpt, round_ = _checkpoint(run_dir, checkpoint)
    setup = _setup(run_dir, cfg, data)
    server, model = _server(cfg, data, setup, ckpt, round_)
    ckpt.close()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    if algorithm_spec(cfg.federated.algorithm).needs_models:  # the messenger: a model of its own, never LoRA
        return TrainedModel(cfg, model, server.params, tokenizer, round_, server.params)
    model, params = lora.merge(setup.config, lora.join(setup.base, server.params))
    return TrainedModel(cfg, model, params, tokenizer, round_, server.params)


def load_personal(run_dir: Path, clients: list[int]) -> tuple[object, list[dict]] | None:
    """(ModelConfig, params per client): the personal models of ``clients`` (LoRA merged) as the run's algorithm
    defines them, from its client store and latest checkpoint (a client that never trained: the model it would start
    from); None when the algorithm keeps no personal models."""
    run_dir = Path(run_dir)
    cfg, data = read_config(run_dir)
    spec = algorithm_spec(cfg.federated.algorithm)
    setup = _setup(run_dir, cfg, data)
    hooks = None
    if spec.needs_models:
        from fedjax_code.experiments.messenger import Messenger

        hooks = Messenger(cfg, setup.config, data.vocab_size).models(setup.base)
    algorithm = build_algorithm(cfg.federated, lambda p, b: loss_fn(p, setup.config, b), models=hooks)
    if algorithm.personal is None:
        return None
    ckpt, round_ = _checkpoint(run_dir, None)
    server, _ = _server(cfg, data, setup, ckpt, round_)
    ckpt.close()
    row = jax.eval_shape(algorithm.init_client, server, jnp.int32(0))
    rows, fresh = ClientStore(run_dir / "client_state", row, data.num_clients).gather(clients)
    rows = with_fresh(algorithm, server, rows, fresh, jnp.asarray(clients, jnp.int32))
    params = []
    for i in range(len(clients)):
        personal = algorithm.personal(server, jax.tree.map(lambda x: x[i], rows))  # noqa: B023 (used at once)
        model, merged = lora.merge(setup.config, lora.join(setup.base, personal))
        params.append(merged)
    return model, params
