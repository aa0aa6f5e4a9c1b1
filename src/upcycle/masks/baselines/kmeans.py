"""Balanced k-means: K clusters of exactly equal size (MoEfication splits an FFN's neurons this way).

Legend: N points, D features, K clusters.
"""

from __future__ import annotations

import torch


def balanced_assign(distances: torch.Tensor) -> torch.Tensor:
    """Greedy balanced assignment: visit (point, cluster) pairs from nearest to farthest, placing each point in the
    first cluster that still has room; cluster sizes are N // K, the first N % K one larger.
    distances [N, K] -> cluster of each point [N] (long)."""
    n, k = distances.shape
    order = torch.argsort(distances.reshape(-1))  # [N·K], nearest pairs first
    assignment = torch.full((n,), -1, dtype=torch.long)
    room = [n // k + (1 if c < n % k else 0) for c in range(k)]
    placed = 0
    for flat in order.tolist():
        point, cluster = divmod(flat, k)
        if assignment[point] >= 0 or room[cluster] == 0:
            continue
        assignment[point] = cluster
        room[cluster] -= 1
        placed += 1
        if placed == n:
            break
    return assignment


def balanced_kmeans(points: torch.Tensor, clusters: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster points [N, D] into `clusters` groups of sizes differing by at most one. -> assignment [N]."""
    n = points.shape[0]
    if not 1 <= clusters <= n:
        raise ValueError(f"need 1 <= clusters <= points, got {clusters} clusters for {n} points")
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=generator)[:clusters]].clone()  # [K, D]
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        assignment = balanced_assign(torch.cdist(points, centroids))
        for c in range(clusters):
            members = points[assignment == c]
            if members.numel():
                centroids[c] = members.mean(0)
    return assignment
