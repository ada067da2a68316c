"""Topic classes: deterministic, every class big enough, readable names, hand-checkable entropy."""

import math

import datasets
import numpy as np
import pytest

from fedjax_code.config import DataConfig
from fedjax_code.data import topics
from fedjax_code.data.prepare import load_prepared, read_stats


@pytest.fixture(scope="module")
def doc_counts(prepared):
    _, _, tokens, offsets = load_prepared(prepared)
    return topics.doc_token_counts(tokens, offsets, read_stats(prepared)["vocab_size"])


def test_topics_are_deterministic_and_every_class_holds_the_minimum(prepared, doc_counts):
    n = doc_counts.shape[0]
    for k in (4, 12):
        labels = topics.assign_topics(doc_counts, k)
        assert np.array_equal(labels, topics.assign_topics(doc_counts, k))
        expected_k = min(k, n // topics.min_class_size(n))  # the 93-file fixture is too small for 12 classes of 8
        assert labels.max() + 1 == expected_k
        assert np.bincount(labels).min() >= topics.min_class_size(n)
    stored = datasets.load_from_disk(str(prepared / "dataset"))["topic"]
    assert stored == topics.assign_topics(doc_counts, DataConfig().topics).tolist()  # what prepare wrote


def test_min_class_size_and_tiny_corpora():
    assert topics.min_class_size(100) == 8 and topics.min_class_size(2_000) == 20
    counts = topics.doc_token_counts(np.array([1, 5, 2, 1, 6, 2, 1, 5, 5, 2]), np.array([0, 3, 6, 10]), 8)
    assert topics.assign_topics(counts, 12).tolist() == [0, 0, 0]  # 3 records: one class


def test_top_up_moves_the_cheapest_records_into_small_classes():
    sim = np.array([[0.9, 0.1], [0.8, 0.7], [0.9, 0.2], [0.9, 0.3]])
    assert topics.top_up(sim, np.array([0, 0, 0, 0]), 1).tolist() == [0, 1, 0, 0]  # row 1 loses least (0.1)
    assert topics.top_up(sim, np.array([0, 0, 0, 0]), 2).tolist() == [0, 1, 0, 1]


def test_doc_token_counts_and_hellinger_rows():
    counts = topics.doc_token_counts(np.array([1, 3, 3, 2, 1, 2]), np.array([0, 4, 6]), 4)
    assert counts.toarray().tolist() == [[0, 1, 1, 2], [0, 1, 1, 0]]
    x = topics.hellinger(counts).toarray()
    assert np.allclose(x[0], np.sqrt([0, 0.25, 0.25, 0.5])) and np.allclose((x * x).sum(1), 1)


def test_unigram_entropy_by_hand():
    assert topics.unigram_entropy([5, 5]) == pytest.approx(math.log(2))
    assert topics.unigram_entropy([3, 1, 0]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert topics.unigram_entropy([7]) == 0


def test_topic_terms_name_each_class(prepared, doc_counts):
    labels = topics.assign_topics(doc_counts, DataConfig().topics)
    tokenizer = load_prepared(prepared)[1]
    terms = topics.topic_terms(doc_counts, labels, tokenizer)
    assert len(terms) == labels.max() + 1
    assert all(len(t) == 5 and all(w and w == w.strip() for w in t) for t in terms)
    assert read_stats(prepared)["topic_terms"] == terms
