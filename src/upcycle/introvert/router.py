"""Sequence-level routing for MoIN: each whole document goes to its nearest cluster centroid (one expert).

`CentroidRouter.route` is the MoIN rule (never per token, outputs never mixed); `mixture` is c-BTM's top-k rule with
weights softmax(−d² / T) over the k nearest centroids. Both search a FAISS flat (exact) index built once.

Distances are squared L2 for both metrics; for cosine they are taken between unit vectors, ‖q̂ − ĉ‖² = 2 − 2·cos,
so the nearest centroid is the most similar one and d² lies in [0, 4].

Shapes: N queries, K centroids (experts), D embedding width, k experts chosen per query.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from upcycle.errors import UserError
from upcycle.introvert.clustering import Clusters, as_points, check_metric

# Below this many queries FAISS searches without BLAS, one query per OpenMP thread: extra threads get no work but
# still join the barrier, and when the cores are busy (training next door) waiting for them costs milliseconds.
# Measured here at K=10,000, D=384, batch 1: 31 ms p50 with 2 threads, 0.23 ms with 1.
_SINGLE_THREAD_BELOW = 20


class CentroidRouter:
    """Nearest-centroid router over K centroids [K, D] with the 'cosine' or 'l2' metric."""

    def __init__(self, centroids: np.ndarray, metric: str = "cosine"):
        import faiss

        check_metric(metric)
        self.metric = metric
        self.centroids = as_points(centroids, metric)  # [K, D], unit rows for cosine
        # Cosine searches inner products (largest first) and converts them to distances; l2 searches distances.
        self.index = faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(self.dim)
        self.index.add(self.centroids)

    @classmethod
    def load(cls, directory: str | Path) -> CentroidRouter:
        """The router of the clusters saved in `directory` (see `Clusters.save`)."""
        clusters = Clusters.load(directory)
        return cls(clusters.centroids, clusters.metric)

    @property
    def num_experts(self) -> int:
        """Number of centroids K."""
        return len(self.centroids)

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self.centroids.shape[1]

    def route(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each embedding [N, D]: ([N] int64 expert ids, [N] float32 squared distances)."""
        ids, distances = self._search(embeddings, 1)  # [N, 1] each
        return ids[:, 0], distances[:, 0]

    def mixture(self, embeddings: np.ndarray, top_k: int, temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """c-BTM: the `top_k` nearest centroids ([N, k] int64, nearest first) and weights softmax(−d² / T) [N, k]."""
        if not 1 <= top_k <= self.num_experts:
            raise UserError(f"top_k must be between 1 and the number of experts ({self.num_experts}), got {top_k}")
        if not temperature > 0:
            raise UserError(f"the mixture temperature must be > 0, got {temperature}")
        ids, distances = self._search(embeddings, top_k)  # [N, k] each, ascending distance
        return ids, _softmax(-distances.astype(np.float64) / temperature).astype(np.float32)

    def _search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest centroids of each query: ([N, k] int64 ids, [N, k] float32 squared distances)."""
        queries = as_points(embeddings, self.metric)  # [N, D]
        if queries.shape[1] != self.dim:
            raise UserError(f"embeddings are {queries.shape[1]} wide but the router's centroids are {self.dim} wide; "
                            "embed with the embedder the clusters were fitted with")
        with _faiss_threads(1 if len(queries) < _SINGLE_THREAD_BELOW else None):
            scores, ids = self.index.search(queries, k)  # [N, k]: inner products (cosine) or squared distances (l2)
        distances = np.maximum(2.0 - 2.0 * scores, 0.0) if self.metric == "cosine" else scores
        return ids.astype(np.int64), distances.astype(np.float32)


@contextlib.contextmanager
def _faiss_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with `threads` OpenMP threads inside the block (None: unchanged). OpenMP's thread count is a
    per-calling-thread setting, so other Python threads searching or clustering at the same time are unaffected."""
    if threads is None:
        yield
        return
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, k], shifted by the row maximum so that exp never overflows."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _reference_route(centroids: np.ndarray, embeddings: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 nearest-centroid routing, as a loop:

        for each query q:                        (cosine: q and every centroid scaled to unit length first)
            d[c] = sum over j of (q[j] − centroid[c][j])²   for every centroid c
            expert = the c with the smallest d[c] (the lowest c on ties); distance = d[expert]
    """
    queries, points = _reference_points(embeddings, metric), _reference_points(centroids, metric)
    ids, distances = [], []
    for q in queries:
        d = [float(((q - c) ** 2).sum()) for c in points]
        best = min(range(len(d)), key=lambda c: (d[c], c))
        ids.append(best)
        distances.append(d[best])
    return np.array(ids, np.int64), np.array(distances)


def _reference_mixture(centroids: np.ndarray, embeddings: np.ndarray, metric: str, top_k: int,
                       temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 c-BTM mixture, as a loop:

        for each query q:
            d[c] = squared distance of q to centroid c, as in _reference_route, for every c
            chosen = the top_k centroids in ascending (d[c], c) order
            weight[j] = exp(−d[chosen[j]] / T) / sum over i of exp(−d[chosen[i]] / T)

    (computed with every d shifted by the smallest, which leaves the weights unchanged and keeps exp finite)
    """
    queries, points = _reference_points(embeddings, metric), _reference_points(centroids, metric)
    ids, weights = [], []
    for q in queries:
        d = [float(((q - c) ** 2).sum()) for c in points]
        chosen = sorted(range(len(d)), key=lambda c: (d[c], c))[:top_k]
        w = [np.exp(-(d[c] - d[chosen[0]]) / temperature) for c in chosen]
        ids.append(chosen)
        weights.append([v / sum(w) for v in w])
    return np.array(ids, np.int64), np.array(weights)


def _reference_points(x: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
