"""Client partitions of a prepared corpus (``fedjax-code data partition``).

Every record has a ``group`` (its package: who wrote it) and a ``topic`` (one of about a dozen
classes of what the code is about, computed from its tokens: see :mod:`topics`). Label skew is over
topics, as over the classes of an image data set; ``group`` is the natural feature skew.

Schemes, and the skew each creates. flwr-datasets' partitioners are used where they fit, so that
results mean what they mean in Flower (the dataset is shuffled with the seed first, as Flower's
``FederatedDataset`` does); where one measurably did not fit, the reason is given:

  * ``iid``           none: the examples, shuffled and sorted by topic, are dealt round-robin, so every
                      client's topic mix equals the global one to +-1 example per topic and sizes differ
                      by at most 1. flwr's IidPartitioner cuts random shards whose mixes differ by
                      sampling noise alone (at 4 clients its group heterogeneity was above dirichlet
                      alpha=10's for some seeds on the default corpus).
  * ``dirichlet``     label skew over ``topic``, in the form of Flower and NIID-Bench (Li et al. 2022;
                      Hsu et al. 2019, arXiv:1909.06335, draw each client's topic mix ~ Dir(alpha * p)
                      instead): each topic draws client proportions p_t ~ Dir(alpha) and each of its
                      examples goes to client c with probability p_t[c]; redrawn (10 tries, as Flower
                      does) until every client has ``min_client_examples``. Smaller alpha, more skew.
                      Not flwr's DirichletPartitioner: it cuts each class at floor(cumsum(p_t) * size),
                      so every class smaller than K lands whole on the last client (measured on the
                      default corpus by group, 16 clients, alpha=10: one client got 330 of 1,380 files,
                      another 8).
  * ``pathological``  extreme label skew, PathologicalPartitioner: each client holds ``k`` topics
                      (``groups_per_client``; McMahan et al. 2017); topics no client draws stay unused
                      (client -1, counted in ``unassigned``).
  * ``natural``       feature skew, NaturalIdPartitioner: one client per group (package); with fewer
                      clients than groups, groups are merged into exactly K clients balanced by tokens
                      (largest group first onto the lightest client). flwr's GroupedNaturalIdPartitioner
                      takes a group size, not a client count, and cannot hit every K.
  * ``size``          quantity skew (Li et al. 2022, arXiv:2102.02079): client sizes ~ Dir(alpha) over
                      K, at least ``min_client_examples`` each, cut by SizePartitioner.

Without topics (``partition(..., topics=None)``) the label-skew schemes fall back to ``group``.

The document maps every example to its client, describes each client (its group and topic
histograms), and measures the skew: ``group_distance`` and ``label_distance``, the mean over clients
of the total-variation distance between the client's group (topic) histogram and the global one;
and, from the tokens (``partition_prepared``), ``heterogeneity``: the mean over clients of the
Jensen-Shannon distance (base 2, in [0, 1]) between the client's train token-unigram distribution
and the pooled one, next to ``heterogeneity_floor``, the same for random document splits with the
same client sizes: what finite samples give without any skew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
from scipy.spatial.distance import jensenshannon

from fedjax_code.config import PartitionConfig
from fedjax_code.data.prepare import load_prepared, read_stats
from fedjax_code.data.shards import split_point
from fedjax_code.data.topics import unigram_entropy
from fedjax_code.errors import UserError
from fedjax_code.records import write_atomic

FLOOR_SEEDS = 5  # random splits averaged into heterogeneity_floor


def _flower_partitioner(cfg: PartitionConfig, n: int, seed: int):
    from flwr_datasets import partitioner as fp  # 1.7 s to import (measured): only for the schemes that use it

    if cfg.scheme == "pathological":
        return fp.PathologicalPartitioner(cfg.clients, "label", cfg.groups_per_client, "random", seed=seed)
    if cfg.scheme == "size":
        return fp.SizePartitioner(_skewed_sizes(cfg, n, seed))
    return fp.NaturalIdPartitioner("group")


def _skewed_sizes(cfg: PartitionConfig, n: int, seed: int) -> list[int]:
    """Client sizes ~ Dir(alpha), each >= min_client_examples, summing to n."""
    floor = cfg.min_client_examples
    if n < floor * cfg.clients:
        raise UserError(f"{n} examples cannot give {cfg.clients} clients {floor} examples each")
    share = np.random.default_rng(seed).dirichlet(np.full(cfg.clients, cfg.alpha))
    extra = np.floor(share * (n - floor * cfg.clients)).astype(int)
    extra[np.argmax(share)] += n - floor * cfg.clients - extra.sum()
    return [int(floor + e) for e in extra]


def _iid(labels: list, cfg: PartitionConfig, seed: int) -> np.ndarray:
    """Client per example: shuffled, sorted by label, dealt round-robin (stratified IID)."""
    garr = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(garr))
    order = order[np.argsort(garr[order], kind="stable")]
    client = np.empty(len(garr), np.int64)
    client[order] = np.arange(len(garr)) % cfg.clients
    return client


def _dirichlet(labels: list, cfg: PartitionConfig, seed: int, tries: int = 10) -> np.ndarray:
    """Client per example: label g's examples drawn from Categorical(p_g), p_g ~ Dir(alpha)."""
    _, g = np.unique(labels, return_inverse=True)
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        p = rng.dirichlet(np.full(cfg.clients, cfg.alpha), size=int(g.max()) + 1)  # [G, K]
        cdf = np.cumsum(p[g], axis=1)  # [N, K]
        client = np.minimum((cdf < rng.random((len(g), 1)) * cdf[:, -1:]).sum(1), cfg.clients - 1)
        if np.bincount(client, minlength=cfg.clients).min() >= cfg.min_client_examples:
            return client
    raise UserError(
        f"dirichlet(alpha={cfg.alpha}) left a client with fewer than {cfg.min_client_examples} examples "
        f"in {tries} draws; use fewer clients or a larger alpha"
    )


def _merge_groups(groups: np.ndarray, tokens: np.ndarray, k: int) -> np.ndarray:
    """Client per example after merging groups into k clients balanced by token count."""
    names, inverse = np.unique(groups, return_inverse=True)
    weight = np.bincount(inverse, weights=tokens)
    load, client_of_group = np.zeros(k), np.zeros(len(names), np.int64)
    for g in sorted(range(len(names)), key=lambda g: (-weight[g], names[g])):
        client_of_group[g] = int(np.argmin(load))
        load[client_of_group[g]] += weight[g]
    return client_of_group[inverse]


def assign_clients(groups: list[str], n_tokens: list[int], cfg: PartitionConfig, seed: int,
                   topics: list[int] | None = None) -> np.ndarray:
    """Client id (int64 [N]) for every example, or a UserError for an impossible request. The label-skew
    schemes (iid, dirichlet, pathological) split by ``topics``, or by ``groups`` when there are none."""
    labels, kind = (groups, "groups") if topics is None else (list(topics), "topics")
    n, n_groups = len(groups), len(set(groups))
    if cfg.clients > n:
        raise UserError(f"cannot split {n} examples across {cfg.clients} clients (more clients than examples)")
    if cfg.scheme == "pathological" and cfg.groups_per_client > len(set(labels)):
        raise UserError(f"{kind} per client ({cfg.groups_per_client}) exceeds the {len(set(labels))} {kind} "
                        "in the corpus")
    if cfg.scheme == "natural":
        if cfg.clients > n_groups:
            raise UserError(f"the natural partition has at most {n_groups} clients (one per group), not {cfg.clients}")
        if cfg.clients < n_groups:
            return _merge_groups(np.asarray(groups), np.asarray(n_tokens, float), cfg.clients)
    if cfg.scheme in ("iid", "dirichlet"):
        return (_iid if cfg.scheme == "iid" else _dirichlet)(labels, cfg, seed)
    table = datasets.Dataset.from_dict({"group": groups, "label": labels, "idx": list(range(n))})
    partitioner = _flower_partitioner(cfg, n, seed)
    partitioner.dataset = table if cfg.scheme == "natural" else table.shuffle(seed=seed)
    client = np.full(n, -1, np.int64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flwr warns about groups left unused; we count them
            for c in range(partitioner.num_partitions):
                client[partitioner.load_partition(c)["idx"]] = c
    except ValueError as err:  # flwr explains an infeasible request in its first line
        raise UserError(f"the {cfg.scheme} partition is infeasible here: {str(err).splitlines()[0]}") from None
    return client


def mix_distance(labels: np.ndarray, client: np.ndarray, k: int) -> float:
    """Mean total-variation distance between each client's label (group or topic) histogram and the global one."""
    names, g = np.unique(labels, return_inverse=True)
    counts = np.zeros((k, len(names)))
    np.add.at(counts, (client, g), 1)
    local = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    overall = counts.sum(0) / counts.sum()
    return float(np.mean(0.5 * np.abs(local - overall).sum(1)))


def partition(groups: list[str], n_tokens: list[int], cfg: PartitionConfig, seed: int,
              topics: list[int] | None = None) -> dict:
    """The partition document: per-client descriptions, label heterogeneity and the assignment."""
    client = assign_clients(groups, n_tokens, cfg, seed, topics)
    k = int(client.max()) + 1 if cfg.scheme == "natural" and len(client) else cfg.clients
    used = client >= 0
    tokens = np.bincount(client[used], weights=np.asarray(n_tokens)[used], minlength=k).astype(np.int64)
    empty = np.flatnonzero(tokens == 0)
    if len(empty):
        raise UserError(f"client {int(empty[0])} is left with no tokens by the {cfg.scheme} partition; use fewer clients")
    garr, tarr = np.asarray(groups), np.asarray(topics if topics is not None else [], np.int64)
    clients = []
    for c in range(k):
        mine = client == c
        clients.append({
            "client": c,
            "n_examples": int(mine.sum()),
            "n_tokens": int(tokens[c]),
            "groups": dict(sorted(Counter(garr[mine].tolist()).items())),
            **({"topics": np.bincount(tarr[mine], minlength=tarr.max() + 1).tolist()} if len(tarr) else {}),
        })
    by_topic = {"label_distance": round(mix_distance(tarr[used], client[used], k), 6)} if len(tarr) else {}
    return {
        "scheme": cfg.scheme,
        "params": {k_: v for k_, v in dataclasses.asdict(cfg).items() if k_ not in ("scheme", "heldout_frac")},
        "seed": seed,
        "num_clients": k,
        "group_distance": round(mix_distance(garr[used], client[used], k), 6),
        **by_topic,
        "unassigned": int((~used).sum()),
        "clients": clients,
        "example_client": client.tolist(),
    }


def client_unigrams(tokens: np.ndarray, offsets: np.ndarray, client: np.ndarray, k: int, vocab: int,
                    heldout_frac: float) -> np.ndarray:
    """int64 [k, V]: token counts of each client's train stream, cut as ``build_shards`` cuts it (the
    client's documents in order, train up to the split point); examples of client -1 are left out."""
    order = np.argsort(client, kind="stable")
    order = order[client[order] >= 0]
    owner, lengths = client[order], np.diff(offsets)[order]
    per_doc = np.split(lengths, np.searchsorted(owner, np.arange(1, k)))
    train = np.array([split_point(d, heldout_frac) for d in per_doc])  # train tokens of each client
    per_client = np.bincount(owner, weights=lengths, minlength=k).astype(np.int64)
    pos = np.cumsum(lengths) - lengths - (np.cumsum(per_client) - per_client)[owner]  # doc start in its client's stream
    take = np.clip(train[owner] - pos, 0, lengths)  # tokens of each document in the train split
    start = np.repeat(offsets[:-1][order] - (np.cumsum(take) - take), take) + np.arange(take.sum())
    ids = np.asarray(tokens[start], np.int64)
    return np.bincount(np.repeat(owner, take) * vocab + ids, minlength=k * vocab).reshape(k, vocab)


def js_to_pooled(counts: np.ndarray) -> float:
    """Mean over rows (clients) of the Jensen-Shannon distance, base 2, between the row's unigram
    distribution and the pooled one (all rows summed)."""
    counts = np.asarray(counts, np.float64)
    return float(np.mean(jensenshannon(counts, counts.sum(0, keepdims=True), axis=1, base=2)))


def measure_skew(tokens: np.ndarray, offsets: np.ndarray, client: np.ndarray, vocab: int,
                 heldout_frac: float, seed: int) -> dict:
    """heterogeneity of the split, its floor (the mean over FLOOR_SEEDS random document splits with the same
    number of documents per client: ``client`` permuted) and the pooled train tokens' unigram entropy (nats)."""
    k = int(client.max()) + 1
    counts = client_unigrams(tokens, offsets, client, k, vocab, heldout_frac)
    floor = [js_to_pooled(client_unigrams(tokens, offsets, np.random.default_rng([seed, s]).permutation(client),
                                            k, vocab, heldout_frac)) for s in range(FLOOR_SEEDS)]
    return {
        "heterogeneity": round(js_to_pooled(counts), 6),
        "heterogeneity_floor": round(float(np.mean(floor)), 6),
        "unigram_entropy": round(unigram_entropy(counts.sum(0)), 6),
    }


def partition_prepared(data_dir: Path, cfg: PartitionConfig, seed: int) -> dict:
    """The partition document of a prepared directory, by topic, with the token measures of its skew."""
    data_dir = Path(data_dir)
    dataset, _, tokens, offsets = load_prepared(data_dir)
    if "topic" not in dataset.column_names:
        raise UserError(f"{data_dir} was prepared without topic classes; prepare it again with --force")
    doc = partition(dataset["group"], dataset["n_tokens"], cfg, seed, dataset["topic"])
    client = np.asarray(doc["example_client"])
    measured = measure_skew(tokens, offsets, client, read_stats(data_dir)["vocab_size"], cfg.heldout_frac, seed)
    head = {k: v for k, v in doc.items() if k not in ("clients", "example_client")}
    return {**head, **measured, "clients": doc["clients"], "example_client": doc["example_client"]}


def partition_hash(doc: dict) -> str:
    """A short content hash of the client assignment (what a run records and resume compares)."""
    return hashlib.sha256(json.dumps(doc["example_client"]).encode()).hexdigest()[:16]


def write_partition(doc: dict, out: Path) -> None:
    """Write the partition JSON deterministically (same seed -> byte-identical file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(doc, indent=1) + "\n")


def read_partition(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
        doc["example_client"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a readable partition file (make one with `fedjax-code data partition`)") from None
    return doc
