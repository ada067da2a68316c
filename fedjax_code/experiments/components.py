"""From an ExperimentConfig to the pieces of a run: client shards, model config and algorithm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedjax_code.config import ExperimentConfig, FederatedConfig, config_hash
from fedjax_code.errors import UserError

SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


def client_shards(cfg: ExperimentConfig, progress: bool = True):
    """(ClientShards, examples per client [K], vocab size): prepared, partitioned and packed, all cached."""
    from fedjax_code.data.partition import partition, read_partition, write_partition
    from fedjax_code.data.prepare import load_prepared, prepare, read_stats
    from fedjax_code.data.shards import ClientShards, build_shards

    data_dir = prepare(cfg.data, progress=progress)
    pcfg = cfg.clients.partition_config(cfg.seed)
    key = config_hash(pcfg)
    part_path = data_dir / "partitions" / f"{key}.json"
    if not part_path.is_file():
        dataset = load_prepared(data_dir)[0]
        write_partition(partition(dataset["group"], dataset["n_tokens"], pcfg), part_path)
    doc = read_partition(part_path)
    shard_dir = data_dir / "shards" / f"{key}-heldout{cfg.clients.heldout_frac}"
    if not (shard_dir / "tokens.bin").is_file():
        _, _, tokens, offsets = load_prepared(data_dir)
        build_shards(tokens, offsets, np.asarray(doc["example_client"]), shard_dir, cfg.clients.heldout_frac)
    examples = np.array([c["n_examples"] for c in doc["clients"]], np.float32)
    return ClientShards.open(shard_dir, seed=cfg.seed), examples, read_stats(data_dir)["vocab_size"]


def model_config(cfg: ExperimentConfig, vocab_size: int):
    """The base preset scaled by ``model.scale``, with the tokenizer's vocabulary and the run's dtype."""
    from fedjax_code.models import get_preset, scale

    try:
        base = get_preset(cfg.model.base)
    except ValueError as err:
        raise UserError(str(err)) from None
    scaled = scale(base, cfg.model.scale)
    return dataclasses.replace(scaled, vocab_size=vocab_size, dtype=cfg.model.dtype,
                               max_len=max(scaled.max_len, cfg.federated.seq_len))


# On CPU a client batch of this many tokens already keeps the cores busy; vmapping more clients than
# that only grows the working set (measured with benchmarks/round_throughput.py, see the README).
CPU_TOKENS_IN_FLIGHT = 512


def parallel_clients(f: FederatedConfig, cohort: int, devices: int, platform: str) -> int | None:
    """How many of the (padded) ``cohort`` clients train at once: ``map_clients``'s ``parallel``.

    ``federated.clients_in_parallel`` when set (rounded to a divisor of the cohort that is a multiple of the
    device count); otherwise all of them (one vmap) on accelerators, and on CPU as many per device as keep
    about CPU_TOKENS_IN_FLIGHT tokens in flight.
    """
    wanted = f.clients_in_parallel
    if not wanted:
        if platform != "cpu":
            return None
        wanted = devices * max(1, CPU_TOKENS_IN_FLIGHT // (f.batch_size * f.seq_len))
    fits = [v for v in range(devices, cohort + 1, devices) if cohort % v == 0 and v <= max(wanted, devices)]
    return None if fits[-1] >= cohort else fits[-1]


def algorithm(f: FederatedConfig, loss, parallel: int | None = None):
    """The FederatedAlgorithm that ``federated.algorithm`` names, with its client and server optimisers.

    ``parallel``: clients trained at once (see ``parallel_clients``)."""
    from fedjax_code import federated as fl

    client_opt = fl.client_optimizer(f.client_optimizer, f.client_lr, clip_norm=f.clip_norm)
    server_name = f.algorithm if f.algorithm in SERVER_OPTIMIZERS else "sgd"
    server_opt = fl.server_optimizer(server_name, f.server_lr, momentum=f.server_momentum)
    if f.algorithm == "fedprox":
        return fl.fedprox(loss, client_opt, f.mu, server_opt, parallel)
    if f.algorithm == "scaffold":
        if f.client_optimizer != "sgd":
            raise UserError("scaffold needs federated.client_optimizer = 'sgd' (its control variates assume plain SGD)")
        return fl.scaffold(loss, f.client_lr, server_opt, parallel, f.clip_norm)
    if f.algorithm == "fednova":
        return fl.fednova(loss, client_opt, server_opt, parallel)
    return fl.fedavg(loss, client_opt, server_opt, parallel)


def communicated_bytes(f: FederatedConfig, model_bytes: int, selected: int, participants: int) -> tuple[int, int]:
    """(bytes_up, bytes_down) of one round: the model each way, twice for SCAFFOLD (control variates)."""
    factor = 2 if f.algorithm == "scaffold" else 1
    return participants * model_bytes * factor, selected * model_bytes * factor


def run_dir_state(out: Path) -> str:
    """'empty', 'finished' (summary.json) or 'unfinished' (anything else)."""
    if not out.exists() or not any(out.iterdir()):
        return "empty"
    return "finished" if (out / "summary.json").is_file() else "unfinished"
