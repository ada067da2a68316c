"""From an ExperimentConfig to the pieces of a run: its client data (prepared, partitioned, packed, all
cached, with the hashes of what it is) and how many clients train at once."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedjax_code.config import ExperimentConfig, FederatedConfig, config_hash
from fedjax_code.data.partition import partition_hash, partition_prepared, read_partition, write_partition
from fedjax_code.data.prepare import load_prepared, prepare, read_stats, tokens_sha256
from fedjax_code.data.shards import ClientShards, build_shards
from fedjax_code.rundir import DataProvenance


class ClientData(NamedTuple):
    shards: ClientShards
    examples: np.ndarray   # float32 [K]: examples per client (sampling and aggregation weights)
    tokenizer_dir: Path
    provenance: DataProvenance


def client_data(cfg: ExperimentConfig, progress: bool = True) -> ClientData:
    """The run's client shards, prepared, partitioned and packed (all cached); the token stream is hashed
    from its bytes, so a resumed run can tell whether its data changed."""
    data_dir = prepare(cfg.data, progress=progress)
    key = config_hash(cfg.partition, {"seed": cfg.seed})
    part_path = data_dir / "partitions" / f"{key}.json"
    if not part_path.is_file():
        write_partition(partition_prepared(data_dir, cfg.partition, cfg.seed), part_path)
    doc = read_partition(part_path)
    shard_dir = data_dir / "shards" / key
    if not (shard_dir / "tokens.bin").is_file():
        _, _, tokens, offsets = load_prepared(data_dir)
        build_shards(tokens, offsets, np.asarray(doc["example_client"]), shard_dir, cfg.partition.heldout_frac)
    examples = np.array([c["n_examples"] for c in doc["clients"]], np.float32)
    provenance = DataProvenance(tokens_sha256(data_dir), partition_hash(doc), len(examples),
                                read_stats(data_dir)["vocab_size"], doc["unigram_entropy"], doc["heterogeneity"],
                                doc["heterogeneity_floor"], doc["label_distance"])
    return ClientData(ClientShards.open(shard_dir, seed=cfg.seed), examples, data_dir / "tokenizer", provenance)


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
