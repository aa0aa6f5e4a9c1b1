"""k-means (plain and balanced), the saved clusters directory, and the per-cluster summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import small_corpus_texts
from upcycle.errors import UserError
from upcycle.introvert.clustering.clusters import Clusters, fit_kmeans, read_assignments
from upcycle.introvert.clustering.summary import summarize_clusters, top_terms, write_summary
from upcycle.ops.kmeans import balanced_assign, reference_balanced_assign

SMALL_CORPUS_IDS = ["json/decoder.py", "json/encoder.py", "email/message.py", "email/utils.py", "asyncio/queues.py",
                    "asyncio/locks.py", "textwrap.py", "heapq.py", "bisect.py", "fractions.py"]


def _blobs(sizes: list[int], dim: int = 8, seed: int = 0, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Tight Gaussian blobs around random far-apart directions: (points [N, dim], true labels [N])."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    return points.astype(np.float32), labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings group the points identically, whatever the cluster numbers."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_recovers_separated_blobs(metric):
    points, labels = _blobs([40, 25, 30, 5], seed=1)
    clusters = fit_kmeans(points, 4, metric=metric, seed=0, restarts=10)
    assert _same_partition(clusters.assignments, labels)
    assert clusters.centroids.shape == (4, 8) and clusters.centroids.dtype == np.float32
    assert sorted(clusters.sizes.tolist()) == [5, 25, 30, 40]
    if metric == "cosine":
        np.testing.assert_allclose(np.linalg.norm(clusters.centroids, axis=1), 1.0, rtol=1e-5)
    # distances are each point's squared distance to its own centroid (unit points for cosine)
    unit = points / np.linalg.norm(points, axis=1, keepdims=True) if metric == "cosine" else points
    expected = ((unit - clusters.centroids[clusters.assignments]) ** 2).sum(1)
    np.testing.assert_allclose(clusters.distances, expected, rtol=1e-4, atol=1e-6)


def test_balanced_caps_every_cluster_and_centroids_are_member_means():
    points, _ = _blobs([60, 25, 10, 5], seed=2)  # N = 100, K = 4 -> at most 25 per cluster
    plain = fit_kmeans(points, 4, metric="l2", seed=0, restarts=10)
    assert plain.sizes.max() == 60, "unbalanced k-means keeps the big blob together"
    balanced = fit_kmeans(points, 4, metric="l2", balanced=True, seed=0, restarts=10)
    assert balanced.balanced and balanced.sizes.max() <= math.ceil(100 / 4) and balanced.sizes.sum() == 100
    for c in range(4):
        members = points[balanced.assignments == c]
        np.testing.assert_allclose(balanced.centroids[c], members.mean(0), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60), dim=st.integers(1, 5), data=st.data())
def test_greedy_balanced_assignment_matches_the_loop_reference(seed, n, dim, data):
    k = data.draw(st.integers(1, min(n, 12)))
    candidates = data.draw(st.integers(1, k))  # few candidates send documents down the "all full, look further" path
    capacity = math.ceil(n / k) + data.draw(st.integers(0, 2))
    rng = np.random.default_rng(seed)
    x, centroids = rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((k, dim)).astype(np.float32)
    fast = balanced_assign(x, centroids, capacity, candidates=candidates)
    assert np.array_equal(fast, reference_balanced_assign(x, centroids, capacity))
    assert np.bincount(fast, minlength=k).max() <= capacity and fast.min() >= 0


@pytest.mark.parametrize("balanced", [False, True])
def test_ten_thousand_clusters(balanced):
    points = np.random.default_rng(0).standard_normal((20_000, 16)).astype(np.float32)
    clusters = fit_kmeans(points, 10_000, metric="cosine", balanced=balanced, seed=0, iterations=2)
    assert clusters.k == 10_000 and clusters.sizes.sum() == 20_000
    assert clusters.assignments.min() >= 0 and clusters.assignments.max() < 10_000
    if balanced:
        assert clusters.sizes.max() <= 2


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_one_cluster_is_the_mean(metric):
    points, _ = _blobs([7, 6], seed=3)
    clusters = fit_kmeans(points, 1, metric=metric)
    assert clusters.assignments.tolist() == [0] * 13
    unit = points / np.linalg.norm(points, axis=1, keepdims=True) if metric == "cosine" else points
    mean = unit.mean(0)
    expected = mean / np.linalg.norm(mean) if metric == "cosine" else mean
    np.testing.assert_allclose(clusters.centroids[0], expected, atol=1e-5)


def test_same_seed_same_clusters():
    points = np.random.default_rng(4).standard_normal((500, 8)).astype(np.float32)
    first, second = fit_kmeans(points, 10, seed=7), fit_kmeans(points, 10, seed=7)
    assert np.array_equal(first.assignments, second.assignments)
    assert np.array_equal(first.centroids, second.centroids)


def test_bad_cluster_counts_and_embeddings_say_what_to_fix():
    points = np.random.default_rng(5).standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(UserError, match=r"5 documents but --clusters 8; use --clusters <= 5 or add data"):
        fit_kmeans(points, 8)
    for k in (0, -3):
        with pytest.raises(UserError, match="--clusters must be a positive integer"):
            fit_kmeans(points, k)
    with pytest.raises(UserError, match="restarts must be >= 1"):
        fit_kmeans(points, 2, restarts=0)
    with pytest.raises(UserError, match="0 documents but --clusters 2"):
        fit_kmeans(np.zeros((0, 4), np.float32), 2)
    with pytest.raises(UserError, match="--metric manhattan"):
        fit_kmeans(points, 2, metric="manhattan")
    with pytest.raises(UserError, match="2-D"):
        fit_kmeans(points[0], 1)
    bad = points.copy()
    bad[2, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        fit_kmeans(bad, 2)


def test_save_and_load_round_trip(tmp_path):
    points, _ = _blobs([6, 4], seed=6)
    ids = [f"doc-{i}.py" for i in range(10)]
    clusters = fit_kmeans(points, 2, metric="l2", balanced=True, seed=0)
    clusters.save(tmp_path, ids, embedder="tfidf")
    assert {p.name for p in tmp_path.iterdir()} == {"centroids.npy", "distances.npy", "assignments.json",
                                                    "clusters.json"}
    assert read_assignments(tmp_path) == {i: int(c) for i, c in zip(ids, clusters.assignments, strict=True)}
    meta = json.loads((tmp_path / "clusters.json").read_text())
    assert meta["k"] == 2 and meta["metric"] == "l2" and meta["embedder"] == "tfidf" and meta["balanced"]
    assert meta["sizes"] == clusters.sizes.tolist() and meta["documents"] == 10
    loaded = Clusters.load(tmp_path)
    assert np.array_equal(loaded.centroids, clusters.centroids)
    assert np.array_equal(loaded.assignments, clusters.assignments)
    assert np.array_equal(loaded.distances, clusters.distances)
    assert (loaded.metric, loaded.balanced, loaded.embedder) == ("l2", True, "tfidf")


def test_save_rejects_bad_ids_and_load_rejects_missing_or_inconsistent_files(tmp_path):
    clusters = fit_kmeans(np.random.default_rng(7).standard_normal((4, 3)).astype(np.float32), 2)
    with pytest.raises(ValueError, match="3 document ids for 4 assignments"):
        clusters.save(tmp_path, ["a", "b", "c"])
    with pytest.raises(UserError, match="not unique"):
        clusters.save(tmp_path, ["a", "b", "c", "a"])
    with pytest.raises(UserError, match="does not exist"):
        Clusters.load(tmp_path / "nowhere")
    clusters.save(tmp_path, ["a", "b", "c", "d"])
    meta = json.loads((tmp_path / "clusters.json").read_text())
    (tmp_path / "clusters.json").write_text(json.dumps({**meta, "k": 3}))
    with pytest.raises(UserError, match="inconsistent"):
        Clusters.load(tmp_path)


def _reference_top_terms(texts, assignments, k, terms):
    """c-TF-IDF as loops: words per cluster, counts per term, score = tf / words(c) * log(1 + A / f(t))."""
    from sklearn.feature_extraction.text import CountVectorizer

    from upcycle.introvert.clustering.summary import TOKEN_PATTERN, stop_words

    analyze = CountVectorizer(token_pattern=TOKEN_PATTERN, stop_words=list(stop_words())).build_analyzer()
    counts = [dict() for _ in range(k)]
    for text, c in zip(texts, assignments, strict=True):
        for token in analyze(text):
            counts[c][token] = counts[c].get(token, 0) + 1
    words = [sum(cluster.values()) for cluster in counts]
    average = sum(words) / k
    total = {}
    for cluster in counts:
        for token, n in cluster.items():
            total[token] = total.get(token, 0) + n
    result = []
    for c in range(k):
        scores = {t: n / words[c] * math.log(1 + average / total[t]) for t, n in counts[c].items()}
        result.append(sorted(scores, key=lambda t: (-scores[t], t))[:terms])
    return result


def test_top_terms_match_the_loop_reference_and_name_the_topics():
    texts = small_corpus_texts()
    assignments = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])  # json, email, asyncio, the rest
    top = top_terms(texts, assignments, 4, terms=8)
    assert top == _reference_top_terms(texts, assignments, 4, 8)
    assert "json" in top[0] and "header" in top[1] and "lock" in top[2]
    assert all(len(t) >= 3 and t not in {"self", "def", "the", "return"} for row in top for t in row)


def test_summary_lists_sizes_terms_and_nearest_documents(tmp_path):
    texts = small_corpus_texts()
    assignments = np.array([0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    distances = np.array([0.5, 0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.05, 0.6, 0.4], np.float32)
    clusters = Clusters(np.zeros((4, 2), np.float32), assignments, distances, metric="cosine", embedder="minilm")
    summaries = write_summary(tmp_path, texts, SMALL_CORPUS_IDS, clusters, terms=5, examples=2)
    assert [s.size for s in summaries] == [2, 2, 6, 0]
    assert summaries[0].examples == ["json/encoder.py", "json/decoder.py"]  # nearest first
    assert summaries[2].examples == ["heapq.py", "fractions.py"]
    assert summaries[3].examples == [] and summaries[3].top_terms == [] and summaries[3].mean_distance is None
    assert summaries[0].mean_distance == pytest.approx(0.3)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [s["cluster"] for s in saved] == [0, 1, 2, 3] and saved[0]["top_terms"] == summaries[0].top_terms
    table = (tmp_path / "summary.md").read_text()
    assert "embedder=minilm" in table and "| 2 | 6 |" in table and "`heapq.py`, `fractions.py`" in table
    assert summarize_clusters(texts, SMALL_CORPUS_IDS, clusters, terms=5, examples=2) == summaries
