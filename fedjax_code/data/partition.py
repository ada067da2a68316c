"""Client partitions of a prepared corpus (``fedjax-code data partition``).

Schemes. flwr-datasets' partitioners are used where they fit, so that results
mean what they mean in Flower (the dataset is shuffled with the seed first, as
Flower's ``FederatedDataset`` does); where one measurably did not fit, the
reason is given:

  * ``iid``           stratified: the examples, shuffled and sorted by group, are dealt round-robin,
                      so every client's group mix equals the global one to +-1 example per group
                      and sizes differ by at most 1. flwr's IidPartitioner cuts random shards whose
                      mixes differ by sampling noise alone; on the default corpus (324 groups,
                      1,380 files) its heterogeneity at 4 clients (0.30) was above dirichlet
                      alpha=10's for some seeds; the stratified split measures 0.15.
  * ``dirichlet``     label skew over ``group`` (Hsu et al. 2019, arXiv:1909.06335): each group
                      draws client proportions p_g ~ Dir(alpha) and each of its examples goes to
                      client c with probability p_g[c]; redrawn (10 tries, as Flower does) until
                      every client has ``min_client_examples``. Not flwr's DirichletPartitioner:
                      it cuts each group at floor(cumsum(p_g) * size), so every group smaller than
                      K lands whole on the last client (measured on the default corpus, 16
                      clients, alpha=10: one client got 330 of 1,380 files, another 8).
  * ``pathological``  PathologicalPartitioner: each client holds ``k`` groups (McMahan et al. 2017);
                      groups no client draws stay unused (client -1, counted in ``unassigned``).
  * ``natural``       NaturalIdPartitioner, one client per group; with fewer clients than groups,
                      groups are merged into exactly K clients balanced by tokens (largest group
                      first onto the lightest client). flwr's GroupedNaturalIdPartitioner takes a
                      group size, not a client count, and cannot hit every K (10 groups -> 6
                      clients is impossible with equal group sizes), hence this one step of our own.
  * ``size``          quantity skew (Li et al. 2022, arXiv:2102.02079): client sizes ~ Dir(alpha)
                      over K, at least ``min_client_examples`` each, cut by SizePartitioner.

The output maps every example to its client and describes each client, plus the
heterogeneity: the mean over clients of the total-variation distance between the
client's group distribution and the global one (0 for a perfectly IID split).
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

from fedjax_code.config import PartitionConfig
from fedjax_code.errors import UserError
from fedjax_code.records import write_atomic


def _flower_partitioner(cfg: PartitionConfig, n: int, seed: int):
    from flwr_datasets import partitioner as fp  # 1.7 s to import (measured): only for the schemes that use it

    if cfg.scheme == "pathological":
        return fp.PathologicalPartitioner(cfg.clients, "group", cfg.groups_per_client, "random", seed=seed)
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


def _iid(groups: list[str], cfg: PartitionConfig, seed: int) -> np.ndarray:
    """Client per example: shuffled, sorted by group, dealt round-robin (stratified IID)."""
    garr = np.asarray(groups)
    order = np.random.default_rng(seed).permutation(len(garr))
    order = order[np.argsort(garr[order], kind="stable")]
    client = np.empty(len(garr), np.int64)
    client[order] = np.arange(len(garr)) % cfg.clients
    return client


def _dirichlet(groups: list[str], cfg: PartitionConfig, seed: int, tries: int = 10) -> np.ndarray:
    """Client per example: group g's examples drawn from Categorical(p_g), p_g ~ Dir(alpha)."""
    _, g = np.unique(groups, return_inverse=True)
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


def assign_clients(groups: list[str], n_tokens: list[int], cfg: PartitionConfig, seed: int) -> np.ndarray:
    """Client id (int64 [N]) for every example, or a UserError for an impossible request."""
    n, n_groups = len(groups), len(set(groups))
    if cfg.clients > n:
        raise UserError(f"cannot split {n} examples across {cfg.clients} clients (more clients than examples)")
    if cfg.scheme == "pathological" and cfg.groups_per_client > n_groups:
        raise UserError(f"groups per client ({cfg.groups_per_client}) exceeds the {n_groups} groups in the corpus")
    if cfg.scheme == "natural":
        if cfg.clients > n_groups:
            raise UserError(f"the natural partition has at most {n_groups} clients (one per group), not {cfg.clients}")
        if cfg.clients < n_groups:
            return _merge_groups(np.asarray(groups), np.asarray(n_tokens, float), cfg.clients)
    if cfg.scheme in ("iid", "dirichlet"):
        return (_iid if cfg.scheme == "iid" else _dirichlet)(groups, cfg, seed)
    table = datasets.Dataset.from_dict({"group": groups, "idx": list(range(n))})
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


def heterogeneity(groups: np.ndarray, client: np.ndarray, k: int) -> float:
    """Mean total-variation distance between each client's group histogram and the global one."""
    names, g = np.unique(groups, return_inverse=True)
    counts = np.zeros((k, len(names)))
    np.add.at(counts, (client, g), 1)
    local = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    overall = counts.sum(0) / counts.sum()
    return float(np.mean(0.5 * np.abs(local - overall).sum(1)))


def partition(groups: list[str], n_tokens: list[int], cfg: PartitionConfig, seed: int) -> dict:
    """The partition document: per-client descriptions, heterogeneity and the assignment."""
    client = assign_clients(groups, n_tokens, cfg, seed)
    k = int(client.max()) + 1 if cfg.scheme == "natural" and len(client) else cfg.clients
    used = client >= 0
    tokens = np.bincount(client[used], weights=np.asarray(n_tokens)[used], minlength=k).astype(np.int64)
    empty = np.flatnonzero(tokens == 0)
    if len(empty):
        raise UserError(f"client {int(empty[0])} is left with no tokens by the {cfg.scheme} partition; use fewer clients")
    garr = np.asarray(groups)
    clients = []
    for c in range(k):
        mine = garr[client == c]
        clients.append({
            "client": c,
            "n_examples": int(len(mine)),
            "n_tokens": int(tokens[c]),
            "groups": dict(sorted(Counter(mine.tolist()).items())),
        })
    return {
        "scheme": cfg.scheme,
        "params": {k_: v for k_, v in dataclasses.asdict(cfg).items() if k_ not in ("scheme", "heldout_frac")},
        "seed": seed,
        "num_clients": k,
        "heterogeneity": round(heterogeneity(garr[used], client[used], k), 6),
        "unassigned": int((~used).sum()),
        "clients": clients,
        "example_client": client.tolist(),
    }


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
