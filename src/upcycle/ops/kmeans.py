"""Balanced k-means, the one copy: capacity-capped greedy assignment by distance rank, alternated with centroid means.

Used for introvert's document clusters (c-BTM trains on balanced k-means; every cluster holds at most ceil(N / K)
documents) and for MoEfication's neuron experts (every cluster exactly N // K neurons, the first N % K one more).

The assignment visits every (point, cluster) pair in ascending squared distance (ties: lower point, then lower
cluster) and gives the point that cluster if it has none yet and the cluster has room. `balanced_assign` computes it
without the N x K distance table: each point walks its own nearest clusters through a heap, and only a point whose
nearest `CANDIDATES` clusters are all full looks further. `reference_balanced_assign` is the plain loop; the tests
compare the two.

Legend: N points, K clusters, D width, M candidates per point.
"""

from __future__ import annotations

import heapq

import numpy as np

CANDIDATES = 16  # nearest clusters fetched per point for the greedy balanced pass


def equal_sizes(n: int, k: int) -> np.ndarray:
    """[K] capacities that split n points exactly: N // K each, the first N % K one more."""
    return np.array([n // k + (1 if c < n % k else 0) for c in range(k)], dtype=np.int64)


def balanced_kmeans(x: np.ndarray, centroids: np.ndarray, capacity: int | np.ndarray, rounds: int,
                    spherical: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Alternate capacity-capped greedy assignment and centroid means at most `rounds` times (until the assignment
    stops changing), from `centroids` [K, D]. capacity: one cap for every cluster or [K] caps, summing to >= N.

    Returns (centroids [K, D], assignments [N]); the centroids are the means of their assigned points (unit rows
    with `spherical`), in the dtype of the given centroids.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    previous = None
    for _ in range(rounds):
        assignments = balanced_assign(x, centroids, capacity)  # [N]
        if previous is not None and np.array_equal(assignments, previous):
            break
        centroids = centroid_means(x, assignments, centroids, spherical)
        previous = assignments
    return centroids, previous


def balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: int | np.ndarray,
                    candidates: int = CANDIDATES) -> np.ndarray:
    """Greedy assignment by distance rank under `capacity` per cluster: the same result as
    `reference_balanced_assign`, without the N x K table.

    Each point keeps a list of its nearest clusters (FAISS search, then exact float64 distances); a heap holds every
    unassigned point's next candidate, so pairs come out in the global ascending order. A full cluster stays full,
    so a rejected point just moves to its next candidate, and one whose list runs out gets a new one: the nearest few
    of the clusters that still have room.
    """
    n, k = len(x), len(centroids)
    caps = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (k,)).tolist()
    m = min(k, candidates)
    _, nearest = search(x, centroids, m)  # [N, M]
    exact = sq_distances(x, centroids, nearest)  # [N, M] float64, the same numbers the reference computes
    order = np.lexsort((nearest, exact), axis=1)  # ascending distance, ties to the lower cluster id
    lists = [(d.tolist(), c.tolist()) for d, c in zip(np.take_along_axis(exact, order, 1),
                                                       np.take_along_axis(nearest, order, 1), strict=True)]
    sizes = [0] * k
    room = np.array([cap > 0 for cap in caps])  # [K] clusters below capacity; a full cluster never reopens
    assignments = np.full(n, -1, dtype=np.int64)
    heap = [(lists[i][0][0], i, 0) for i in range(n)]  # (distance, point, rank in its list)
    heapq.heapify(heap)
    while heap:
        _, i, rank = heapq.heappop(heap)
        dists, clusters = lists[i]
        cluster = clusters[rank]
        if sizes[cluster] < caps[cluster]:
            assignments[i] = cluster
            sizes[cluster] += 1
            room[cluster] = sizes[cluster] < caps[cluster]
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
    open_ = np.flatnonzero(room)  # never empty while a point waits: the capacities sum to >= N
    d = sq_distances(point[None], centroids, open_[None])[0]  # [open]
    if len(open_) > count:  # only the nearest few are likely needed; a point that runs out again asks again
        keep = np.argpartition(d, count - 1)[:count]
        open_, d = open_[keep], d[keep]
    step = np.lexsort((open_, d))
    return d[step].tolist(), open_[step].tolist()


def reference_balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: int | np.ndarray) -> np.ndarray:
    """Plain greedy balanced assignment, as a loop:

        for (d, i, c) in sorted((‖x_i − c_c‖², i, c) for every point i and cluster c):
            if point i has no cluster and cluster c has fewer than capacity[c] points: give i cluster c
    """
    n, k = len(x), len(centroids)
    caps = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (k,))
    table = sq_distances(x, centroids, np.broadcast_to(np.arange(k), (n, k)))  # [N, K]
    sizes = [0] * k
    assignments = np.full(n, -1, dtype=np.int64)
    for _, i, c in sorted((table[i, c], i, c) for i in range(n) for c in range(k)):
        if assignments[i] < 0 and sizes[c] < caps[c]:
            assignments[i] = c
            sizes[c] += 1
    return assignments


def sq_distances(x: np.ndarray, centroids: np.ndarray, ids: np.ndarray, chunk_elements: int = 1 << 22) -> np.ndarray:
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


def centroid_means(x: np.ndarray, assignments: np.ndarray, old: np.ndarray, spherical: bool = False) -> np.ndarray:
    """[K, D] mean of each cluster's points (unit rows with `spherical`), in old's dtype; an empty cluster keeps its
    old centroid."""
    k = len(old)
    sums = np.zeros(old.shape, np.float64)
    np.add.at(sums, assignments, x)
    counts = np.bincount(assignments, minlength=k)
    means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], old).astype(old.dtype)
    return np.ascontiguousarray(unit_rows(means) if spherical else means)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x [N, D] with every row scaled to unit L2 norm (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(x.dtype).tiny)


def search(x: np.ndarray, centroids: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The `m` nearest centroids of each point by squared L2 (FAISS flat): ([N, m] distances, [N, m] ids)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    distances, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), m)
    return distances, ids.astype(np.int64)


def kmeans_centroids(x: np.ndarray, k: int, iterations: int = 25, restarts: int = 1, seed: int = 0,
                     spherical: bool = False) -> np.ndarray:
    """Centroids [K, D] of (unbalanced) k-means of points x [N, D], by FAISS; `restarts` keeps the tightest run.

    min_points_per_centroid=1: FAISS would only warn below 39 points per cluster, and few points per cluster is the
    point of thousands of experts. FAISS subsamples to 256 points per cluster when N is larger (bounded cost).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], int(k), niter=iterations, nredo=restarts, seed=seed, spherical=spherical,
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(x)
    return kmeans.centroids
