"""From an ExperimentConfig to the pieces of a run: its model (the frozen base and the trainable tree), its
client data (prepared, partitioned, packed, all cached, with the hashes of what it is) and how many clients
train at once."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from fedjax_code.cache import building, cache_root
from fedjax_code.config import ExperimentConfig, FederatedConfig, config_hash
from fedjax_code.data.partition import partition_hash, partition_prepared, read_partition, write_partition
from fedjax_code.data.prepare import load_loss_mask, load_prepared, prepare, read_stats, tokens_sha256
from fedjax_code.data.shards import ClientShards, build_shards
from fedjax_code.data.tokenizer import load_tokenizer, tokenizer_sha256
from fedjax_code.errors import UserError
from fedjax_code.models import ModelConfig, Pretrained, get_preset, init_params, load_pretrained, lora, scale
from fedjax_code.rundir import DataProvenance


class RunModel(NamedTuple):
    """A run's model: ``config``, the frozen ``base`` params (``{}`` unless LoRA adapters are trained) and the
    ``trainable`` params at round 0. The model is ``lora.join(base, trainable)``; only ``trainable`` is
    trained, sent and checkpointed."""

    config: ModelConfig
    base: dict
    trainable: dict


def pretrained(cfg: ExperimentConfig) -> Pretrained | None:
    """The run's pretrained model (``model.pretrained``), or None when it trains from scratch."""
    return load_pretrained(cfg.model.pretrained) if cfg.model.pretrained else None


def model_config(cfg: ExperimentConfig, vocab_size: int, base: ModelConfig | None = None) -> ModelConfig:
    """The run's ModelConfig: ``base`` (a pretrained model's) or the preset ``model.base`` scaled by
    ``model.scale`` with the tokenizer's vocabulary and, when set, ``model.tie_embeddings``; with the run's
    dtype and LoRA settings."""
    m = cfg.model
    if base is None:
        scaled = scale(get_preset(m.base), m.scale)
        tie = scaled.tie_embeddings if m.tie_embeddings is None else m.tie_embeddings
        base = dataclasses.replace(scaled, vocab_size=vocab_size, tie_embeddings=tie,
                                   max_len=max(scaled.max_len, cfg.federated.seq_len))
    return dataclasses.replace(base, dtype=m.dtype, **m.lora)


def run_model(cfg: ExperimentConfig, vocab_size: int, pre: Pretrained | None) -> RunModel:
    """The model ``cfg`` trains: from scratch (every param trainable), a pretrained model fine-tuned in full, or
    LoRA adapters (``lora_a`` random, ``lora_b`` zero) on a frozen base, pretrained or random."""
    config = model_config(cfg, vocab_size, pre.config if pre else None)
    if config.vocab_size < vocab_size:
        raise UserError(f"the data's vocabulary ({vocab_size} tokens) does not fit the model's ({config.vocab_size})")
    key = jax.random.PRNGKey(cfg.seed)
    if not config.lora_rank:
        return RunModel(config, {}, pre.params if pre else init_params(config, key))
    base = pre.params if pre else lora.split(init_params(config, key))[0]
    return RunModel(config, base, lora.init_adapters(config, key))


def data_config(cfg: ExperimentConfig, pre: Pretrained | None):
    """``cfg.data``, tokenised with the pretrained model's own tokenizer and framed by its convention (what it puts
    before a text: nothing for SmolLM2, BOS for Llama), as HumanEval prompts it, when there is one."""
    if pre is None:
        return cfg.data
    wanted = tokenizer_sha256(pre.tokenizer)
    if cfg.data.tokenizer and tokenizer_sha256(load_tokenizer(cfg.data.tokenizer)) != wanted:
        raise UserError(f"data.tokenizer {cfg.data.tokenizer} is not the tokenizer of the pretrained model "
                        f"{cfg.model.pretrained!r}; drop data.tokenizer (the model's own is used) or pick another model")
    return dataclasses.replace(cfg.data, tokenizer=str(saved_tokenizer(pre.tokenizer)), document_prefix="tokenizer")


def saved_tokenizer(tokenizer) -> Path:
    """A directory holding ``tokenizer``, in the cache under its content hash (``tokenizer_sha256``)."""
    target = cache_root() / "tokenizers" / tokenizer_sha256(tokenizer)
    if not target.is_dir():
        with building(target) as tmp:
            tokenizer.save_pretrained(str(tmp))
    return target


def params_sha256(params: dict) -> str:
    """A short hash of a param tree's paths, shapes, dtypes and bytes: how a run refers to its frozen base."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: str(kv[0])):
        leaf = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


class ClientData(NamedTuple):
    shards: ClientShards
    examples: np.ndarray   # float32 [K]: examples per client (sampling and aggregation weights)
    tokenizer_dir: Path
    provenance: DataProvenance


def client_data(cfg: ExperimentConfig, progress: bool = True, pre: Pretrained | None = None) -> ClientData:
    """The run's client shards, prepared (with ``pre``'s tokenizer when given), partitioned and packed (all
    cached); the token stream is hashed from its bytes, so a resumed run can tell whether its data changed."""
    data_dir = prepare(data_config(cfg, pre), progress=progress)
    key = config_hash(cfg.partition, {"seed": cfg.seed})
    part_path = data_dir / "partitions" / f"{key}.json"
    if not part_path.is_file():
        write_partition(partition_prepared(data_dir, cfg.partition, cfg.seed), part_path)
    doc = read_partition(part_path)
    shard_dir = data_dir / "shards" / key
    if not (shard_dir / "tokens.bin").is_file():
        _, _, tokens, offsets = load_prepared(data_dir)
        build_shards(tokens, offsets, np.asarray(doc["example_client"]), shard_dir, cfg.partition.heldout_frac,
                     loss_mask=load_loss_mask(data_dir))
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
