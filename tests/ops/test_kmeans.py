"""The one balanced k-means: the heap assignment equals the loop reference for one cap and for per-cluster caps."""

from __future__ import annotations

import numpy as np
import pytest

from upcycle.ops.kmeans import balanced_assign, balanced_kmeans, equal_sizes, reference_balanced_assign


@pytest.mark.parametrize("seed", range(6))
def test_per_cluster_capacities_match_the_reference_and_split_exactly(seed):
    rng = np.random.default_rng(seed)
    n, k = 37, 5
    x, centroids = rng.standard_normal((n, 3)), rng.standard_normal((k, 3))
    caps = equal_sizes(n, k)
    assert caps.tolist() == [8, 8, 7, 7, 7]
    fast = balanced_assign(x, centroids, caps, candidates=2)
    assert np.array_equal(fast, reference_balanced_assign(x, centroids, caps))
    assert np.bincount(fast, minlength=k).tolist() == caps.tolist()


def test_balanced_kmeans_returns_the_means_of_its_assignment():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (20, 2)) for c in (-5.0, 0.0, 5.0)])
    centroids, assignments = balanced_kmeans(x, x[[0, 1, 2]].copy(), 20, rounds=10)
    assert np.bincount(assignments).tolist() == [20, 20, 20]
    for c in range(3):
        np.testing.assert_allclose(centroids[c], x[assignments == c].mean(0))
        assert len(np.unique(assignments[c * 20:(c + 1) * 20])) == 1
    with pytest.raises(ValueError, match="rounds"):
        balanced_kmeans(x, centroids, 20, rounds=0)
