"""CentroidRouter (FAISS flat) against the plain loop references, over a grid of sizes and both metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upcycle.errors import UserError
from upcycle.introvert.clustering.clusters import fit_kmeans
from upcycle.introvert.router import CentroidRouter, _reference_mixture, _reference_route

GRID = settings(max_examples=60, deadline=None)


def _data(seed: int, n: int, k: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian queries [n, dim] and centroids [k, dim]: exact ties have probability zero."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((k, dim)).astype(np.float32)


def _reference_distances(centroids: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """[N, K] float64 squared distances (unit vectors for cosine), to tell near-ties apart."""
    def unit(x):
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x

    return ((unit(queries)[:, None, :] - unit(centroids)[None]) ** 2).sum(-1)


def _assert_same_choice(ids: np.ndarray, expected: np.ndarray, table: np.ndarray) -> None:
    """ids [N, k] equal the reference's, except where float32 rounding may swap two near-equal distances."""
    for row in range(len(ids)):
        for j in range(ids.shape[1]):
            if ids[row, j] != expected[row, j]:
                gap = abs(table[row, ids[row, j]] - table[row, expected[row, j]])
                assert gap < 1e-4 * max(1.0, table[row].max()), (row, j, ids[row], expected[row])


@GRID
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), k=st.integers(1, 40), dim=st.integers(1, 12),
       metric=st.sampled_from(["cosine", "l2"]))
def test_route_matches_the_loop_reference(seed, n, k, dim, metric):
    queries, centroids = _data(seed, n, k, dim)
    ids, distances = CentroidRouter(centroids, metric).route(queries)
    expected_ids, expected_distances = _reference_route(centroids, queries, metric)
    assert ids.shape == (n,) and ids.dtype == np.int64 and distances.shape == (n,)
    _assert_same_choice(ids[:, None], expected_ids[:, None], _reference_distances(centroids, queries, metric))
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-5)


@GRID
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), k=st.integers(1, 30), dim=st.integers(1, 8),
       metric=st.sampled_from(["cosine", "l2"]), data=st.data())
def test_mixture_matches_the_loop_reference(seed, n, k, dim, metric, data):
    top_k = data.draw(st.integers(1, k))
    temperature = data.draw(st.sampled_from([0.05, 0.1, 1.0, 10.0]))
    queries, centroids = _data(seed, n, k, dim)
    if metric == "l2":
        queries *= 0.3  # keep d² / T in a range where a float32 search and a float64 loop agree closely
        centroids *= 0.3
    ids, weights = CentroidRouter(centroids, metric).mixture(queries, top_k, temperature)
    expected_ids, expected_weights = _reference_mixture(centroids, queries, metric, top_k, temperature)
    assert ids.shape == weights.shape == (n, top_k)
    table = _reference_distances(centroids, queries, metric)
    _assert_same_choice(ids, expected_ids, table)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
    # weights of the ids actually chosen, from the reference distances: equal to the router's up to float32 error
    chosen = np.take_along_axis(table, ids, 1)
    logits = -(chosen - chosen[:, :1]) / temperature
    reference_weights = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(weights, reference_weights, atol=2e-4)
    assert np.all(np.diff(weights, axis=1) <= 1e-6), "nearest first means weights never increase"
    if np.array_equal(ids, expected_ids):
        np.testing.assert_allclose(weights, expected_weights, atol=2e-4)


def test_small_batches_search_single_threaded_and_leave_the_thread_count_alone():
    import faiss

    queries, centroids = _data(6, 45, 300, 16)
    router = CentroidRouter(centroids, "cosine")
    before = faiss.omp_get_max_threads()
    batched = router.route(queries)[0]  # BLAS path, default threads
    assert faiss.omp_get_max_threads() == before
    one_by_one = np.concatenate([router.route(q[None])[0] for q in queries])  # single-threaded path
    assert faiss.omp_get_max_threads() == before
    assert np.array_equal(batched, one_by_one)


def test_single_expert_takes_everything():
    queries, centroids = _data(0, 7, 1, 5)
    for metric in ("cosine", "l2"):
        router = CentroidRouter(centroids, metric)
        ids, _ = router.route(queries)
        assert ids.tolist() == [0] * 7
        mixed_ids, weights = router.mixture(queries, top_k=1)
        assert mixed_ids.tolist() == [[0]] * 7 and np.allclose(weights, 1.0)


def test_each_centroid_routes_to_itself_and_cosine_ignores_scale():
    _, centroids = _data(1, 1, 50, 16)
    for metric in ("cosine", "l2"):
        ids, distances = CentroidRouter(centroids, metric).route(centroids)
        assert ids.tolist() == list(range(50))
        np.testing.assert_allclose(distances, 0.0, atol=1e-5)
    router = CentroidRouter(centroids, "cosine")
    queries, _ = _data(2, 30, 1, 16)
    assert np.array_equal(router.route(queries)[0], router.route(7.5 * queries)[0])
    cosine_distances = router.route(queries)[1]
    assert np.all((cosine_distances >= 0) & (cosine_distances <= 4))


def test_router_agrees_with_the_kmeans_assignment():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    for metric in ("cosine", "l2"):
        clusters = fit_kmeans(x, 12, metric=metric, seed=0, iterations=10)
        ids, distances = CentroidRouter(clusters.centroids, metric).route(x)
        assert np.array_equal(ids, clusters.assignments)
        np.testing.assert_allclose(distances, clusters.distances, rtol=1e-4, atol=1e-5)


def test_load_from_a_saved_clusters_directory(tmp_path):
    x = np.random.default_rng(4).standard_normal((40, 6)).astype(np.float32)
    clusters = fit_kmeans(x, 4, metric="l2", seed=0)
    clusters.save(tmp_path, [f"doc{i}" for i in range(40)])
    router = CentroidRouter.load(tmp_path)
    assert router.metric == "l2" and router.num_experts == 4 and router.dim == 6
    assert np.array_equal(router.route(x)[0], clusters.assignments)


def test_bad_input_says_what_to_fix():
    queries, centroids = _data(5, 3, 4, 8)
    router = CentroidRouter(centroids, "cosine")
    with pytest.raises(UserError, match="between 1 and the number of experts"):
        router.mixture(queries, top_k=5)
    with pytest.raises(UserError, match="between 1 and the number of experts"):
        router.mixture(queries, top_k=0)
    with pytest.raises(UserError, match="temperature"):
        router.mixture(queries, top_k=2, temperature=0.0)
    with pytest.raises(UserError, match="16 wide but the router's centroids are 8 wide"):
        router.route(np.zeros((2, 16), np.float32))
    with pytest.raises(UserError, match="2-D"):
        router.route(queries[0])
    with pytest.raises(UserError, match="--metric dot"):
        CentroidRouter(centroids, "dot")
