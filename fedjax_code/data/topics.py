"""Topic classes: a coarse label for every record, so that partitions can skew labels as in vision FL.

Label skew (each client sees some classes far more often than others, the mixes drawn from a
Dirichlet) is how Hsu et al. 2019 (arXiv:1909.06335) make federated clients non-identical: it
changes what each client's data is about, not only how much it holds. Code has no class labels,
and the natural ``group`` (top-level package) is too fine: at a few MB of budget most groups hold
one file, and a Dirichlet split over one-file groups is just a random split of files. So the
classes are computed from the data, for any source:

  1. each document becomes the vector sqrt(p) of its token-unigram distribution p (the ids already in
     tokens.bin): a unit vector whose dot product with another is the Bhattacharyya coefficient, so
     cosine geometry here is Hellinger geometry, close to the Jensen-Shannon distance with which a
     partition's ``heterogeneity`` is measured. (TF-IDF vectors, tried first, emphasise rare tokens
     that carry little probability mass: their topics separated the clients' token distributions less);
  2. spherical k-means (k-means++ seeds, a few restarts, the best kept; fixed seed) groups them into
     ``k`` classes (``DataConfig.topics``, 12 by default; 8-20 are sensible);
  3. a class with fewer than ``min_class_size`` records takes the records that cost least to move
     from classes that can spare them, so each class holds enough files that a client can be skewed.

``topic_terms`` names a class by its top tokens under class-based TF-IDF.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse

METHOD = "hellinger-spherical-kmeans/1"  # part of the prepared data's cache key: change it with the method


def min_class_size(n: int) -> int:
    """Fewest records a class may hold: max(8, 1% of the records)."""
    return max(8, math.ceil(0.01 * n))


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the unigram distribution with these counts: the loss of a model that learned
    only token frequencies."""
    p = np.asarray(counts, np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def doc_token_counts(tokens: np.ndarray, offsets: np.ndarray, vocab: int) -> sparse.csr_matrix:
    """float64 [N, V]: how often each token occurs in each document tokens[offsets[i]:offsets[i+1]]."""
    ones = np.ones(len(tokens), np.float64)
    counts = sparse.csr_matrix((ones, np.asarray(tokens, np.int32), offsets), shape=(len(offsets) - 1, vocab))
    counts.sum_duplicates()  # built from the stream: one entry per token, summed per (document, token)
    return counts


def hellinger(counts: sparse.csr_matrix) -> sparse.csr_matrix:
    """Rows sqrt(p_i) of the documents' unigram distributions: unit vectors whose dot product is the
    Bhattacharyya coefficient (1 - squared Hellinger distance)."""
    x = counts.copy()
    x.data = np.sqrt(x.data / np.repeat(np.asarray(x.sum(1)).ravel(), np.diff(x.indptr)))
    return x


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def _class_sums(x: sparse.csr_matrix, labels: np.ndarray, k: int) -> np.ndarray:
    """float64 [k, V]: the sum of each class's rows."""
    member = sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(k, x.shape[0]))
    return (member @ x).toarray()


def _kmeans_pp(x: sparse.csr_matrix, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds for cosine distance: each next seed drawn with probability ~ 1 - max cos."""
    chosen = [int(rng.integers(x.shape[0]))]
    best = (x @ x[chosen[0]].T).toarray().ravel()
    for _ in range(1, k):
        gap = np.maximum(1 - best, 0)
        i = int(rng.choice(len(gap), p=gap / gap.sum())) if gap.sum() > 0 else int(rng.integers(len(gap)))
        chosen.append(i)
        best = np.maximum(best, (x @ x[i].T).toarray().ravel())
    return np.asarray(x[chosen].todense())


def spherical_kmeans(x: sparse.csr_matrix, k: int, seed: int = 0, restarts: int = 4,
                     iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64 [N], centroids [k, V]) maximising the summed cosine similarity, best of ``restarts``."""
    rng = np.random.default_rng(seed)
    best = (-np.inf, None, None)
    for _ in range(restarts):
        cent = _kmeans_pp(x, k, rng)
        labels = np.full(x.shape[0], -1)
        for _ in range(iters):
            sim = np.asarray(x @ cent.T)
            new = sim.argmax(1)
            if np.array_equal(new, labels):
                break
            labels = new
            cent = _normalised(_class_sums(x, labels, k))
        score = sim[np.arange(len(labels)), labels].sum()
        if score > best[0]:
            best = (score, labels, cent)
    return best[1], best[2]


def top_up(sim: np.ndarray, labels: np.ndarray, minimum: int) -> np.ndarray:
    """Labels where every class holds >= ``minimum`` records: the smallest class repeatedly takes the record,
    from a class above the minimum, whose similarity drops least by moving (needs N >= k * minimum)."""
    labels = labels.copy()
    k, rows = sim.shape[1], np.arange(len(labels))
    while (sizes := np.bincount(labels, minlength=k)).min() < minimum:
        small = int(sizes.argmin())
        cost = np.where(sizes[labels] > minimum, sim[rows, labels] - sim[:, small], np.inf)
        labels[int(cost.argmin())] = small
    return labels


def assign_topics(counts: sparse.csr_matrix, k: int, seed: int = 0) -> np.ndarray:
    """Topic (int64 [N]) of each document from its token counts (``doc_token_counts``): k classes, or fewer
    (N // min_class_size(N), at least 1) when the corpus is too small for k classes of the minimum size."""
    n = counts.shape[0]
    k = max(1, min(k, n // min_class_size(n)))
    x = hellinger(counts)
    labels, cent = spherical_kmeans(x, k, seed)
    return top_up(np.asarray(x @ cent.T), labels, min(min_class_size(n), n // k))


def topic_terms(counts: sparse.csr_matrix, labels: np.ndarray, tokenizer, n: int = 5) -> list[list[str]]:
    """A name for each topic: its ``n`` top tokens, decoded, by class-based TF-IDF (the token's share of the
    topic's tokens times log(N / documents that hold it)); whitespace-only and partial-UTF-8 tokens skipped."""
    share = _class_sums(counts, labels, int(labels.max()) + 1)
    share /= share.sum(1, keepdims=True)
    idf = np.log(counts.shape[0] / np.maximum(np.bincount(counts.indices, minlength=counts.shape[1]), 1))

    def words(row: np.ndarray) -> list[str]:  # " name" and "name" read the same: listed once
        names = (tokenizer.decode([int(i)]).strip() for i in np.argsort(-row, kind="stable")[: 10 * n])
        return list(dict.fromkeys(w for w in names if w and "\ufffd" not in w))[:n]

    return [words(row) for row in share * idf]
