"""k-means over document embeddings with FAISS: the clusters that become MoIN's introvert experts.

Metrics: "cosine" is spherical k-means on unit vectors (centroids are unit too, so nearest in L2 is most similar in
cosine); "l2" is plain k-means.

Balanced clusters (c-BTM trains on balanced k-means): every cluster holds at most ceil(N / K) documents. After
FAISS's k-means, `upcycle.ops.kmeans.balanced_kmeans` alternates greedy assignment by distance rank under that cap
with centroid means (at most min(iterations, _BALANCE_ROUNDS) times), so returned centroids are their documents'
means.

Saved layout (`Clusters.save`): centroids.npy [K, D] float32, distances.npy [N] float32, assignments.json
{doc id: cluster} in document order, clusters.json (k, dim, metric, balanced, documents, sizes, embedder), the last
written last so that a directory with clusters.json is complete.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from upcycle.errors import UserError
from upcycle.io import atomic_write_bytes, ensure_writable_dir, read_json, write_json
from upcycle.ops.kmeans import balanced_kmeans, kmeans_centroids, search, unit_rows

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
CENTROIDS_FILE = "centroids.npy"
DISTANCES_FILE = "distances.npy"
ASSIGNMENTS_FILE = "assignments.json"
CLUSTERS_FILE = "clusters.json"

_BALANCE_ROUNDS = 5  # balanced assignment <-> centroid update alternations; each moves few documents after the first


@dataclass
class Clusters:
    """A k-means result: K centroids and each of N documents' cluster (N documents, D embedding width)."""

    centroids: np.ndarray
    """[K, D] float32; unit rows for the cosine metric."""
    assignments: np.ndarray
    """[N] int64 cluster of each document."""
    distances: np.ndarray
    """[N] float32 squared L2 distance of each document to its centroid (on unit vectors for cosine)."""
    metric: str = "cosine"
    """'cosine' or 'l2'."""
    balanced: bool = False
    """Whether assignments were capped at ceil(N / K) per cluster."""
    embedder: str | None = None
    """Kind of the embedder that produced the vectors, when known."""

    def __post_init__(self) -> None:
        check_metric(self.metric)
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.assignments = np.asarray(self.assignments, dtype=np.int64)
        self.distances = np.asarray(self.distances, dtype=np.float32)
        if self.centroids.ndim != 2 or self.assignments.shape != self.distances.shape or self.assignments.ndim != 1:
            raise ValueError(f"inconsistent shapes: centroids {self.centroids.shape}, assignments "
                             f"{self.assignments.shape}, distances {self.distances.shape}")

    @property
    def k(self) -> int:
        """Number of clusters K."""
        return len(self.centroids)

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return self.centroids.shape[1]

    @property
    def sizes(self) -> np.ndarray:
        """[K] int64 documents per cluster."""
        return np.bincount(self.assignments, minlength=self.k)

    def save(self, directory: str | Path, doc_ids: list[str], *, embedder: str | None = None) -> Path:
        """Write the files listed in the module docstring into `directory`, each atomically; returns it."""
        directory = ensure_writable_dir(directory)
        if len(doc_ids) != len(self.assignments):
            raise ValueError(f"{len(doc_ids)} document ids for {len(self.assignments)} assignments")
        assignments = {doc_id: int(c) for doc_id, c in zip(doc_ids, self.assignments, strict=True)}
        if len(assignments) != len(doc_ids):
            raise UserError("document ids are not unique; cannot write assignments.json")
        _save_npy(directory / CENTROIDS_FILE, self.centroids)
        _save_npy(directory / DISTANCES_FILE, self.distances)
        write_json(directory / ASSIGNMENTS_FILE, assignments)
        write_json(directory / CLUSTERS_FILE, {
            "k": self.k, "dim": self.dim, "metric": self.metric, "balanced": self.balanced,
            "documents": len(self.assignments), "embedder": embedder or self.embedder, "sizes": self.sizes.tolist(),
            "mean_distance": float(self.distances.mean()) if len(self.distances) else None,
        })
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Clusters:
        """The clusters saved in `directory` (assignments in the saved document order)."""
        directory = Path(directory)
        meta = read_json(directory / CLUSTERS_FILE)
        assignments = np.array(list(read_assignments(directory).values()), dtype=np.int64)
        clusters = cls(centroids=_load_npy(directory / CENTROIDS_FILE), assignments=assignments,
                       distances=_load_npy(directory / DISTANCES_FILE), metric=meta["metric"],
                       balanced=bool(meta.get("balanced", False)), embedder=meta.get("embedder"))
        if clusters.k != meta["k"] or len(assignments) != meta["documents"]:
            raise UserError(f"{directory} is inconsistent (k={clusters.k} centroids for k={meta['k']}, "
                            f"{len(assignments)} assignments for {meta['documents']} documents); rerun clustering")
        return clusters


def read_assignments(directory: str | Path) -> dict[str, int]:
    """{doc id: cluster} as saved by `Clusters.save`."""
    return read_json(Path(directory) / ASSIGNMENTS_FILE)


def fit_kmeans(embeddings: np.ndarray, k: int, *, metric: str = "cosine", balanced: bool = False, seed: int = 0,
               iterations: int = 25, restarts: int = 1) -> Clusters:
    """K-means (FAISS) of `embeddings` [N, D] into `k` clusters; balanced caps clusters at ceil(N / k) documents.

    `restarts` > 1 runs k-means from that many random starts and keeps the tightest: FAISS starts from random points,
    so one start can leave two centroids in one group of documents and merge two others.
    """
    check_metric(metric)
    x = as_points(embeddings, metric)  # [N, D]
    n = x.shape[0]
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"--clusters must be a positive integer, got {k!r}")
    if n < k:
        raise UserError(f"k-means: {n} documents but --clusters {k}; use --clusters <= {n} or add data")
    if iterations < 1 or restarts < 1:
        raise UserError(f"k-means iterations and restarts must be >= 1, got {iterations} and {restarts}")
    centroids = as_points(kmeans_centroids(x, int(k), iterations, restarts, seed, spherical=metric == "cosine"),
                          metric)  # [K, D]
    if balanced:
        centroids, assignments = balanced_kmeans(x, centroids, math.ceil(n / k), min(iterations, _BALANCE_ROUNDS),
                                                 spherical=metric == "cosine")
    else:
        assignments, _ = _nearest(x, centroids)
    distances = ((x - centroids[assignments]) ** 2).sum(1)  # [N, D] -> [N]
    clusters = Clusters(centroids, assignments, distances, metric=metric, balanced=balanced)
    empty = int((clusters.sizes == 0).sum())
    if empty:
        log.warning("%d of %d clusters have no documents; their experts will have nothing to train on", empty, k)
    return clusters


def _nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by L2 (= by cosine on unit vectors): ([N] int64 ids, [N] float32 squared distances)."""
    distances, ids = search(x, centroids, 1)
    return ids[:, 0], distances[:, 0]


def as_points(embeddings: np.ndarray, metric: str) -> np.ndarray:
    """`embeddings` as validated float32 contiguous [N, D] points, rows L2-normalised for the cosine metric."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise UserError(f"embeddings must be a 2-D [documents, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError("embeddings contain NaN or infinity; check the embedder's input texts")
    if metric == "cosine":
        x = unit_rows(x)
    return np.ascontiguousarray(x)


def check_metric(metric: str) -> None:
    """Raise a UserError unless `metric` is one of METRICS."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: choose one of {', '.join(METRICS)}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; rerun clustering") from None
    except ValueError as error:
        raise UserError(f"{path} is not a valid .npy file ({error}); rerun clustering") from None
