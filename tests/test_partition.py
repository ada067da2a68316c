"""Partition schemes: heterogeneity ordering, token distances, determinism and refusals."""

import math

import datasets
import numpy as np
import pytest

from fedjax_code.config import PartitionConfig
from fedjax_code.data import topics
from fedjax_code.data.partition import (
    client_unigrams,
    js_to_pooled,
    measure_skew,
    mix_distance,
    partition,
    partition_prepared,
    read_partition,
    write_partition,
)
from fedjax_code.data.prepare import load_prepared, read_stats
from fedjax_code.data.shards import ClientShards, build_shards
from fedjax_code.errors import UserError


@pytest.fixture(scope="module")
def corpus_columns():
    """30 groups of 3 to 90 examples (a corpus shaped like many codebases of uneven size)."""
    rng = np.random.default_rng(0)
    groups = [f"pkg{g:02d}" for g in range(30) for _ in range(3 + 3 * g)]
    return groups, rng.integers(50, 5000, len(groups)).tolist()


def _part(columns, scheme, seed=0, **kw):
    return partition(*columns, PartitionConfig(scheme=scheme, **kw), seed)


def test_mix_distance_is_hand_checkable():
    groups = np.array(["a", "a", "b", "b"])
    assert mix_distance(groups, np.array([0, 1, 0, 1]), 2) == 0.0  # each client a/b = 1/2, like the whole
    assert mix_distance(groups, np.array([0, 0, 1, 1]), 2) == 0.5  # TV({a:1}, {a:.5, b:.5}) = 0.5


@pytest.mark.parametrize("clients", [4, 16, 64])
def test_iid_then_dirichlet_10_then_dirichlet_01(corpus_columns, clients):
    h = [_part(corpus_columns, s, clients=clients, alpha=a)["group_distance"]
         for s, a in [("iid", 1.0), ("dirichlet", 10.0), ("dirichlet", 0.1)]]
    assert h[0] < h[1] < h[2]


def test_every_client_is_described(corpus_columns):
    groups, n_tokens = corpus_columns
    doc = _part(corpus_columns, "dirichlet", clients=8, alpha=0.5)
    assignment = np.array(doc["example_client"])
    assert len(assignment) == len(groups) and doc["num_clients"] == 8
    for c in doc["clients"]:
        mine = assignment == c["client"]
        assert c["n_examples"] == mine.sum() == sum(c["groups"].values())
        assert c["n_tokens"] == np.asarray(n_tokens)[mine].sum()
    assert doc["seed"] == 0 and doc["params"]["alpha"] == 0.5


def test_iid_is_balanced(corpus_columns):
    sizes = [c["n_examples"] for c in _part(corpus_columns, "iid", clients=7)["clients"]]
    assert max(sizes) - min(sizes) <= 1


def test_same_seed_same_bytes_other_seed_other_split(corpus_columns, tmp_path):
    for scheme in ("iid", "dirichlet", "pathological", "size"):
        write_partition(_part(corpus_columns, scheme, clients=8, seed=3), tmp_path / "a.json")
        write_partition(_part(corpus_columns, scheme, clients=8, seed=3), tmp_path / "b.json")
        assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes(), scheme
        other = _part(corpus_columns, scheme, clients=8, seed=4)
        assert other["example_client"] != read_partition(tmp_path / "a.json")["example_client"], scheme


def test_pathological_gives_k_groups_per_client(corpus_columns):
    doc = _part(corpus_columns, "pathological", clients=6, groups_per_client=2)
    assert all(1 <= len(c["groups"]) <= 2 for c in doc["clients"])
    assert doc["unassigned"] == sum(1 for c in doc["example_client"] if c < 0)


def test_natural_is_one_client_per_group_or_merged(corpus_columns):
    groups, n_tokens = corpus_columns
    n_groups = len(set(groups))
    doc = _part(corpus_columns, "natural", clients=n_groups)
    assert doc["num_clients"] == n_groups and all(len(c["groups"]) == 1 for c in doc["clients"])
    merged = _part(corpus_columns, "natural", clients=5)
    assert merged["num_clients"] == 5
    owner = {}
    for c in merged["clients"]:
        for g in c["groups"]:
            assert owner.setdefault(g, c["client"]) == c["client"]  # a group is never split
    tokens = [c["n_tokens"] for c in merged["clients"]]
    assert max(tokens) < 1.5 * min(tokens)  # balanced by tokens


def test_size_scheme_skews_quantity_not_groups(corpus_columns):
    doc = _part(corpus_columns, "size", clients=8, alpha=0.3, min_client_examples=3)
    sizes = [c["n_examples"] for c in doc["clients"]]
    assert min(sizes) >= 3 and max(sizes) > 4 * min(sizes) and sum(sizes) == len(corpus_columns[0])


@pytest.mark.parametrize("kw, message", [
    (dict(scheme="iid", clients=10**6), "more clients than examples"),
    (dict(scheme="pathological", clients=4, groups_per_client=10**4), "exceeds the"),
    (dict(scheme="natural", clients=31), "at most 30 clients"),
    (dict(scheme="dirichlet", clients=200, alpha=0.01, min_client_examples=3), "fewer than 3 examples"),
])
def test_infeasible_requests_are_user_errors(corpus_columns, kw, message):
    with pytest.raises(UserError, match=message):
        _part(corpus_columns, **kw)


def test_client_left_with_no_tokens_is_refused():
    with pytest.raises(UserError, match="no tokens"):
        partition(["a"] * 4, [0, 0, 0, 5], PartitionConfig("iid", clients=2), 0)


@pytest.mark.parametrize("kw", [dict(alpha=0), dict(alpha=-1), dict(scheme="nope"), dict(clients=0)])
def test_invalid_config_is_refused(kw):
    with pytest.raises(UserError):
        PartitionConfig(**kw)


def test_js_to_pooled_is_hand_checkable():
    assert js_to_pooled([[2, 2], [1, 1]]) == 0.0  # every client has the pooled distribution
    # p = (1, 0) against the pooled (1/2, 1/2): mixture m = (3/4, 1/4); JS^2 = (KL(p||m) + KL(pooled||m)) / 2
    js = math.sqrt((math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)) / 2)
    assert js_to_pooled([[1, 0], [0, 1]]) == pytest.approx(js)
    assert js_to_pooled([[5, 0], [0, 5], [0, 0.0001]]) <= 1


def test_client_unigrams_count_the_train_streams_of_the_shards(prepared, tmp_path):
    dataset, _, tokens, offsets = load_prepared(prepared)
    client = np.asarray(partition(dataset["group"], dataset["n_tokens"], PartitionConfig("dirichlet", clients=6), 0)
                        ["example_client"])
    shards = ClientShards.open(build_shards(tokens, offsets, client, tmp_path / "s", 0.2))
    vocab = read_stats(prepared)["vocab_size"]
    counts = client_unigrams(tokens, offsets, client, 6, vocab, 0.2)
    for c, (start, split, _) in enumerate(shards.bounds):
        assert np.array_equal(counts[c], np.bincount(shards.tokens[start:split], minlength=vocab))


def test_iid_topic_mix_equals_the_global_one(prepared):
    doc = partition_prepared(prepared, PartitionConfig("iid", clients=8), 0)
    overall = np.bincount(datasets.load_from_disk(str(prepared / "dataset"))["topic"])
    for c in doc["clients"]:
        assert np.all(np.abs(np.array(c["topics"]) - overall / 8) <= 1)
    assert abs(doc["heterogeneity"] - doc["heterogeneity_floor"]) < 0.01  # IID sits at the floor


def test_heterogeneity_rises_iid_then_dirichlet_10_1_05_01(prepared):
    """On the 93-file fixture: 4 topics (its 11 default ones hold 8 files each, too few to skew 4 clients),
    4 clients, heterogeneity averaged over 8 seeds."""
    dataset, _, tokens, offsets = load_prepared(prepared)
    vocab = read_stats(prepared)["vocab_size"]
    labels = topics.assign_topics(topics.doc_token_counts(tokens, offsets, vocab), 4).tolist()

    def measured(scheme, alpha):
        runs = []
        for seed in range(8):
            doc = partition(dataset["group"], dataset["n_tokens"], PartitionConfig(scheme, clients=4, alpha=alpha),
                            seed, labels)
            runs.append(measure_skew(tokens, offsets, np.asarray(doc["example_client"]), vocab, 0.1, seed))
        return [np.mean([r[key] for r in runs]) for key in ("heterogeneity", "heterogeneity_floor")]

    iid, floor = measured("iid", 1.0)
    dirichlet = [measured("dirichlet", a)[0] for a in (10.0, 1.0, 0.5, 0.1)]
    assert abs(iid - floor) < 0.005
    assert floor < dirichlet[0] < dirichlet[1] < dirichlet[2] < dirichlet[3]
    assert dirichlet[3] > floor + 0.05


def test_partition_prepared_reports_skew_and_is_deterministic(prepared, tmp_path):
    cfg = PartitionConfig("dirichlet", clients=4, alpha=0.1)
    write_partition(partition_prepared(prepared, cfg, 3), tmp_path / "a.json")
    write_partition(partition_prepared(prepared, cfg, 3), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    doc = read_partition(tmp_path / "a.json")
    iid = partition_prepared(prepared, PartitionConfig("iid", clients=4), 3)
    assert doc["label_distance"] > 2 * iid["label_distance"]
    assert 0 < iid["heterogeneity"] < doc["heterogeneity"] < 1
    assert doc["unigram_entropy"] == pytest.approx(read_stats(prepared)["unigram_entropy"], abs=0.05)


def test_pathological_gives_k_topics_per_client(prepared):
    doc = partition_prepared(prepared, PartitionConfig("pathological", clients=5, groups_per_client=2), 0)
    assert all(1 <= np.count_nonzero(c["topics"]) <= 2 for c in doc["clients"])
    with pytest.raises(UserError, match="topics per client"):
        partition_prepared(prepared, PartitionConfig("pathological", clients=5, groups_per_client=50), 0)
