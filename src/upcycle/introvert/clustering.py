"""k-means over document embeddings with FAISS: the clusters that become MoIN's introvert experts.

Metrics: "cosine" is spherical k-means on unit vectors (centroids are unit too, so nearest in L2 is most similar in
cosine); "l2" is plain k-means.

Balanced clusters (c-BTM trains on balanced k-means): every cluster holds at most ceil(N / K) documents. After
FAISS's k-means, documents are assigned greedily by distance rank, i.e. every (document, cluster) pair is visited
in ascending squared distance and the document takes that cluster if it has none yet and the cluster has room; then
centroids move to the means of their documents, and the two steps alternate (at most min(iterations,
_BALANCE_ROUNDS) times, until the assignment stops changing), so returned centroids are their documents' means. The
greedy pass does not build the N x K distance table: each document walks its own nearest clusters through a heap, and
only a document whose nearest `_CANDIDATES` clusters are all full looks further.

Saved layout (`Clusters.save`): centroids.npy [K, D] float32, distances.npy [N] float32, assignments.json
{doc id: cluster} in document order, clusters.json (k, dim, metric, balanced, documents, sizes, embedder), the last
written last so that a directory with clusters.json is complete.
"""

from __future__ import annotations

import heapq
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from upcycle.errors import UserError
from upcycle.io import atomic_write_bytes, ensure_writable_dir, read_json, write_json

log = logging.getLogger(__name__)

METRICS = ("cosine", "l2")
CENTROIDS_FILE = "centroids.npy"
DISTANCES_FILE = "distances.npy"
ASSIGNMENTS_FILE = "assignments.json"
CLUSTERS_FILE = "clusters.json"

_BALANCE_ROUNDS = 5  # balanced assignment <-> centroid update alternations; each moves few documents after the first
_CANDIDATES = 16  # nearest clusters fetched per document for the greedy balanced pass


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
    import faiss

    check_metric(metric)
    x = as_points(embeddings, metric)  # [N, D]
    n, dim = x.shape
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise UserError(f"--clusters must be a positive integer, got {k!r}")
    if n < k:
        raise UserError(f"k-means: {n} documents but --clusters {k}; use --clusters <= {n} or add data")
    if iterations < 1 or restarts < 1:
        raise UserError(f"k-means iterations and restarts must be >= 1, got {iterations} and {restarts}")
    # min_points_per_centroid=1: FAISS would only warn below 39 points per cluster, and few points per cluster is
    # the point of thousands of experts. FAISS subsamples to 256 points per cluster when N is larger (bounded cost).
    kmeans = faiss.Kmeans(dim, int(k), niter=iterations, nredo=restarts, seed=seed, spherical=metric == "cosine",
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(x)
    centroids = as_points(kmeans.centroids, metric)  # [K, D]
    if balanced:
        centroids, assignments = _balanced_kmeans(x, centroids, metric, min(iterations, _BALANCE_ROUNDS))
    else:
        assignments, _ = _nearest(x, centroids)
    distances = ((x - centroids[assignments]) ** 2).sum(1)  # [N, D] -> [N]
    clusters = Clusters(centroids, assignments, distances, metric=metric, balanced=balanced)
    empty = int((clusters.sizes == 0).sum())
    if empty:
        log.warning("%d of %d clusters have no documents; their experts will have nothing to train on", empty, k)
    return clusters


def _balanced_kmeans(x: np.ndarray, centroids: np.ndarray, metric: str, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternate capacity-capped greedy assignment and centroid means `rounds` times, from `centroids` [K, D]."""
    capacity = math.ceil(len(x) / len(centroids))
    previous = None
    for _ in range(rounds):
        assignments = _balanced_assign(x, centroids, capacity)  # [N]
        if previous is not None and np.array_equal(assignments, previous):
            break
        centroids = _centroid_means(x, assignments, centroids, metric)
        previous = assignments
    return centroids, previous


def _balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: int, candidates: int = _CANDIDATES) -> np.ndarray:
    """Greedy assignment by distance rank under `capacity` per cluster: the same result as
    `_reference_balanced_assign`, without the N x K table.

    Each document keeps a list of its nearest clusters (FAISS search, then exact float64 distances); a heap holds
    every unassigned document's next candidate, so pairs come out in the global ascending order. A full cluster stays
    full, so a rejected document just moves to its next candidate, and one whose list runs out gets a new one: the
    nearest few of the clusters that still have room.

    Shapes: N documents, K clusters, D width, M candidates per document.
    """
    n, k = len(x), len(centroids)
    m = min(k, candidates)
    _, nearest = _search(x, centroids, m)  # [N, M]
    exact = _sq_distances(x, centroids, nearest)  # [N, M] float64, the same numbers the reference computes
    order = np.lexsort((nearest, exact), axis=1)  # ascending distance, ties to the lower cluster id
    lists = [(d.tolist(), c.tolist()) for d, c in zip(np.take_along_axis(exact, order, 1),
                                                       np.take_along_axis(nearest, order, 1), strict=True)]
    sizes = [0] * k
    room = np.ones(k, dtype=bool)  # [K] clusters below capacity; a full cluster never reopens
    assignments = np.full(n, -1, dtype=np.int64)
    heap = [(lists[i][0][0], i, 0) for i in range(n)]  # (distance, document, rank in its list)
    heapq.heapify(heap)
    while heap:
        _, i, rank = heapq.heappop(heap)
        dists, clusters = lists[i]
        cluster = clusters[rank]
        if sizes[cluster] < capacity:
            assignments[i] = cluster
            sizes[cluster] += 1
            room[cluster] = sizes[cluster] < capacity
            continue
        rank += 1
        if rank == len(clusters):  # every listed cluster is full: list the nearest of those with room
            lists[i] = dists, clusters = _nearest_with_room(x[i], centroids, room, 4 * m)
            rank = 0
        heapq.heappush(heap, (dists[rank], i, rank))
    return assignments


def _nearest_with_room(point: np.ndarray, centroids: np.ndarray, room: np.ndarray, count: int
                       ) -> tuple[list[float], list[int]]:
    """The `count` nearest clusters with room for `point` [D], ascending (distance, id): (distances, ids)."""
    open_ = np.flatnonzero(room)  # never empty while a document waits: K * capacity >= N
    d = _sq_distances(point[None], centroids, open_[None])[0]  # [open]
    if len(open_) > count:  # only the nearest few are likely needed; a document that runs out again asks again
        keep = np.argpartition(d, count - 1)[:count]
        open_, d = open_[keep], d[keep]
    step = np.lexsort((open_, d))
    return d[step].tolist(), open_[step].tolist()


def _reference_balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: int) -> np.ndarray:
    """Plain greedy balanced assignment, as a loop:

        for (d, i, c) in sorted((‖x_i − c_c‖², i, c) for every document i and cluster c):
            if document i has no cluster and cluster c has fewer than `capacity` documents: give i cluster c
    """
    n, k = len(x), len(centroids)
    table = _sq_distances(x, centroids, np.broadcast_to(np.arange(k), (n, k)))  # [N, K]
    sizes = [0] * k
    assignments = np.full(n, -1, dtype=np.int64)
    for _, i, c in sorted((table[i, c], i, c) for i in range(n) for c in range(k)):
        if assignments[i] < 0 and sizes[c] < capacity:
            assignments[i] = c
            sizes[c] += 1
    return assignments


def _sq_distances(x: np.ndarray, centroids: np.ndarray, ids: np.ndarray, chunk_elements: int = 1 << 22) -> np.ndarray:
    """Exact float64 squared distances ‖x[i] − centroids[ids[i, j]]‖²: x [N, D], centroids [K, D], ids [N, M] -> [N, M].

    The difference form, not ‖x‖² + ‖c‖² − 2x·c, so that the fast and reference balanced assignments see identical
    numbers; chunked over rows so that at most `chunk_elements` differences are held at once.
    """
    n, m = ids.shape
    out = np.empty((n, m), np.float64)
    rows = max(1, chunk_elements // max(1, m * x.shape[1]))
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        diff = x[block, None, :].astype(np.float64) - centroids[ids[block]]  # [r, 1, D] - [r, M, D] -> [r, M, D]
        out[block] = (diff * diff).sum(-1)
    return out


def _centroid_means(x: np.ndarray, assignments: np.ndarray, old: np.ndarray, metric: str) -> np.ndarray:
    """[K, D] mean of each cluster's points (unit for cosine); an empty cluster keeps its old centroid."""
    k = len(old)
    sums = np.zeros(old.shape, np.float64)
    np.add.at(sums, assignments, x)
    counts = np.bincount(assignments, minlength=k)
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], old).astype(np.float32)
    return as_points(means, metric)


def _nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by L2 (= by cosine on unit vectors): ([N] int64 ids, [N] float32 squared distances)."""
    distances, ids = _search(x, centroids, 1)
    return ids[:, 0], distances[:, 0]


def _search(x: np.ndarray, centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The `m` nearest centroids of each point by squared L2 (FAISS flat): ([N, m] distances, [N, m] ids)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), m)
    return distances, ids.astype(np.int64)


def as_points(embeddings: np.ndarray, metric: str) -> np.ndarray:
    """`embeddings` as validated float32 contiguous [N, D] points, rows L2-normalised for the cosine metric."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise UserError(f"embeddings must be a 2-D [documents, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError("embeddings contain NaN or infinity; check the embedder's input texts")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)
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
