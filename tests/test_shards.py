"""Client shards: layout, deterministic sampling, held-out split and memory at 10,000 clients."""

import tracemalloc

import numpy as np
import pytest

from fedjax_code.config import PartitionConfig
from fedjax_code.data.partition import partition
from fedjax_code.data.prepare import load_prepared
from fedjax_code.data.shards import ClientShards, build_shards


def _docs(lengths):
    """Documents whose tokens encode (document id, position): doc d is [1000*d + 1, 1000*d + 2, ...]."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([1000 * d + 1 + np.arange(n) for d, n in enumerate(lengths)]).astype(np.uint32)
    return tokens, offsets


def test_layout_groups_each_clients_documents(tmp_path):
    tokens, offsets = _docs([10, 20, 30, 40, 50])
    shards = ClientShards.open(build_shards(tokens, offsets, np.array([1, 0, 1, -1, 0]), tmp_path, 0.25))
    assert shards.num_clients == 2
    (s0, split0, e0), (s1, split1, e1) = shards.bounds
    assert list(np.unique(shards.tokens[s0:e0] // 1000)) == [1, 4]  # docs 1 and 4; doc 3 is unassigned
    assert list(np.unique(shards.tokens[s1:e1] // 1000)) == [0, 2]
    assert (split0 - s0, e0 - split0) == (20, 50)  # split at the document boundary nearest 75%
    assert (split1 - s1, e1 - split1) == (10, 30)


def test_single_document_client_is_split_inside_it(tmp_path):
    tokens, offsets = _docs([100])
    shards = ClientShards.open(build_shards(tokens, offsets, np.array([0]), tmp_path, 0.1))
    assert tuple(shards.bounds[0]) == (0, 90, 100)


@pytest.fixture
def shards(tmp_path):
    tokens, offsets = _docs([300, 200, 500, 5, 400, 600])
    return ClientShards.open(build_shards(tokens, offsets, np.array([0, 0, 1, 2, 3, 3]), tmp_path, 0.2), seed=7)


def test_sample_shape_dtype_and_ownership(shards):
    batch = shards.sample([3, 1, 0], round_=2, local_steps=3, batch_size=4, seq_len=16)
    assert batch.shape == (3, 3, 4, 17) and batch.dtype == np.int32
    for row, client in zip(batch, [3, 1, 0]):
        start, split, _ = shards.bounds[client]
        assert np.isin(row, shards.tokens[start:split]).all()  # only the client's own train tokens
        consecutive = np.diff(row, axis=-1) == 1
        assert consecutive.mean() > 0.9  # windows are contiguous text (up to a document boundary)


def test_sampling_is_deterministic_and_independent_of_the_cohort(shards):
    a = shards.sample([0, 1, 3], 5, 2, 3, 8)
    b = shards.sample([3, 2, 0], 5, 2, 3, 8)
    np.testing.assert_array_equal(a, shards.sample([0, 1, 3], 5, 2, 3, 8))
    np.testing.assert_array_equal(a[0], b[2])  # client 0 gets the same windows beside other clients
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.array_equal(a, shards.sample([0, 1, 3], 6, 2, 3, 8))  # a new round, new windows
    other_seed = ClientShards(shards.tokens, shards.bounds, seed=8)
    assert not np.array_equal(a, other_seed.sample([0, 1, 3], 5, 2, 3, 8))


def test_small_client_samples_with_replacement_by_wrapping(shards):
    start, split, _ = shards.bounds[2]
    assert split - start == 4  # doc of 5 tokens, 4 for training
    batch = shards.sample([2], 0, 2, 2, seq_len=9)
    stream = shards.tokens[start:split]
    for window in batch.reshape(-1, 10):
        first = int(np.flatnonzero(stream == window[0])[0])
        np.testing.assert_array_equal(window, stream[(first + np.arange(10)) % 4])


def test_heldout_windows_come_from_the_heldout_split(shards):
    _, split, end = shards.bounds[3]
    assert end - split == 600  # docs of 400 and 600 tokens: the boundary nearest 80% is at 400
    windows = shards.heldout(3, seq_len=15, windows=20)  # 320 of 600 tokens: spread evenly, a start every 30
    starts = split + 30 * np.arange(20)
    np.testing.assert_array_equal(windows, shards.tokens[starts[:, None] + np.arange(16)])
    wrapped = shards.heldout(3, seq_len=15, windows=40)  # 640 tokens: wraps after 600
    np.testing.assert_array_equal(wrapped.ravel(), shards.tokens[split + np.arange(640) % 600])


def test_ten_thousand_clients_cost_offsets_only(tmp_path):
    n_docs, k = 40_000, 10_000
    tokens, offsets = _docs(np.full(n_docs, 100))  # 4M tokens = 16 MB of uint32
    build_shards(tokens, offsets, np.arange(n_docs) % k, tmp_path, 0.25)
    del tokens
    tracemalloc.start()
    shards = ClientShards.open(tmp_path, seed=0)
    batch = shards.sample(np.arange(0, k, 100), 0, 2, 2, 32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(shards.tokens, np.memmap) and shards.bounds.nbytes == 24 * k
    assert peak < shards.bounds.nbytes + 20 * batch.nbytes + 200_000  # far below the 16 MB of tokens


def test_shards_of_a_prepared_corpus(prepared, tmp_path):
    dataset, tokenizer, tokens, offsets = load_prepared(prepared)
    doc = partition(dataset["group"], dataset["n_tokens"], PartitionConfig("iid", clients=4), 0)
    shards = ClientShards.open(build_shards(tokens, offsets, np.array(doc["example_client"]), tmp_path))
    assert shards.tokens.dtype == np.uint16 and len(shards.tokens) == len(tokens)
    assert (shards.bounds[:, 2] - shards.bounds[:, 0]).tolist() == [c["n_tokens"] for c in doc["clients"]]
    text = tokenizer.decode(shards.sample([1], 0, 1, 1, 64)[0, 0, 0])
    assert len(text) > 20
