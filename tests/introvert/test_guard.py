"""The out-of-domain guard and `EmbeddingRouter.decide` (top-k mixture, base or mixture beyond the threshold)."""

from __future__ import annotations

import numpy as np
import pytest

from upcycle.errors import UserError
from upcycle.introvert.clustering.clusters import Clusters
from upcycle.introvert.config import RoutingConfig
from upcycle.introvert.router import CentroidRouter, EmbeddingRouter, Guard, _reference_mixture, calibrate_guard
from upcycle.introvert.run import Run


class _Lookup:
    """An embedder that maps each text to a fixed vector, so a test chooses every distance."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def _router(config: RoutingConfig, threshold: float | None, validation: np.ndarray | None = None):
    centroids = np.eye(4, 8, dtype=np.float32)  # four orthogonal unit centroids
    rng = np.random.default_rng(0)
    table = {f"near{c}": centroids[c] + 0.05 * rng.standard_normal(8) for c in range(4)}
    table["far"] = np.r_[np.zeros(4), np.ones(4)]  # orthogonal to every centroid: d² = 2 for all
    guard = None if threshold is None else Guard(threshold, np.sort(validation if validation is not None else []))
    return EmbeddingRouter(_Lookup(table), CentroidRouter(centroids), config, guard), table, centroids


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_decide_in_domain_matches_the_mixture_reference(top_k):
    router, table, centroids = _router(RoutingConfig(top_k=top_k, temperature=0.3), threshold=1.0)
    texts = [f"near{c}" for c in range(4)]
    routes = router.decide(texts)
    ids, weights = _reference_mixture(centroids, np.stack([table[t] for t in texts]), "cosine", top_k, 0.3)
    for route, row_ids, row_weights, c in zip(routes, ids, weights, range(4)):
        assert route.in_domain and route.clusters[0] == c
        assert list(route.clusters) == list(row_ids)
        np.testing.assert_allclose(route.weights, row_weights, rtol=1e-5)


def test_beyond_the_threshold_goes_to_the_base_or_a_mixture():
    to_base, _, _ = _router(RoutingConfig(top_k=1, out_of_domain="base"), threshold=1.0)
    far = to_base.decide(["far"])[0]
    assert far.clusters == () and not far.in_domain and far.distance == pytest.approx(2.0, abs=1e-5)
    to_mixture, _, _ = _router(RoutingConfig(top_k=1, out_of_domain="mixture"), threshold=1.0)
    far = to_mixture.decide(["far"])[0]
    assert len(far.clusters) == 2 and not far.in_domain and sum(far.weights) == pytest.approx(1.0)
    assert to_mixture.decide(["near2"])[0].clusters == (2,)  # in domain: still one expert


def test_confidence_is_the_share_of_validation_documents_at_least_as_far():
    validation = np.array([0.1, 0.2, 0.3, 0.4])
    router, _, _ = _router(RoutingConfig(), threshold=0.4, validation=validation)
    assert router.guard.confidence(0.0) == 1.0
    assert router.guard.confidence(0.25) == 0.5
    assert router.guard.confidence(3.0) == 0.0
    assert _router(RoutingConfig(), threshold=None)[0].decide(["far"])[0].confidence is None


def test_top_k_larger_than_the_experts_is_refused():
    router, _, _ = _router(RoutingConfig(), threshold=None)
    with pytest.raises(UserError, match="top_k must be between 1 and the number of experts"):
        router.decide(["near0"], top_k=5)


def _run_with_validation(tmp_path, distances_to_first: np.ndarray) -> Run:
    """A run whose clusters are two unit centroids and whose validation embeddings lie at chosen d² from the first."""
    centroids = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], np.float32)
    run = Run(tmp_path)
    Clusters(centroids, np.zeros(2, np.int64), np.zeros(2, np.float32), "cosine").save(run.clusters_dir, ["a", "b"])
    cos = 1.0 - distances_to_first / 2.0  # d² = 2 - 2 cos between unit vectors
    validation = np.stack([cos, np.sqrt(1.0 - cos**2), np.zeros_like(cos)], axis=1).astype(np.float32)
    (run.clusters_dir / "embeddings").mkdir()
    np.save(run.clusters_dir / "embeddings" / "validation.npy", validation)
    return run


def test_the_threshold_is_a_percentile_of_validation_distances(tmp_path):
    distances = np.linspace(0.0, 0.99, 100)
    run = _run_with_validation(tmp_path, distances)
    guard = calibrate_guard(run, RoutingConfig(guard_percentile=90.0))
    assert guard.threshold == pytest.approx(np.percentile(distances, 90.0), abs=1e-4)
    assert calibrate_guard(run, RoutingConfig(guard_percentile=None)) is None
    assert calibrate_guard(run, RoutingConfig(guard_threshold=0.5)).threshold == 0.5


def test_with_an_embedder_the_guard_is_calibrated_on_validation_prompts(tmp_path, monkeypatch):
    from upcycle.data import Document
    from upcycle.introvert import data

    run = _run_with_validation(tmp_path, np.linspace(0.0, 0.5, 50))  # whole documents: d² up to 0.5
    docs = [Document(f"v{i}", f"{i:03d}" + "x" * 20) for i in range(50)]
    monkeypatch.setattr(data, "load_run_data", lambda _: data.RunData({"validation": docs}, {}))
    prompt_distances = np.linspace(0.0, 1.5, 50)  # their 5-character prompts lie farther
    seen = []

    class Prompts:
        def encode(self, texts):
            seen.extend(texts)
            cos = 1.0 - prompt_distances[[int(t[:3]) for t in texts]] / 2.0
            return np.stack([cos, np.sqrt(1.0 - cos**2), np.zeros_like(cos)], axis=1).astype(np.float32)

    guard = calibrate_guard(run, RoutingConfig(guard_percentile=90.0, guard_prompt_chars=5), embedder=Prompts())
    assert seen == [d.text[:5] for d in docs]
    assert guard.threshold == pytest.approx(np.percentile(prompt_distances, 90.0), abs=1e-4)
    whole = calibrate_guard(run, RoutingConfig(guard_percentile=90.0, guard_prompt_chars=None), embedder=Prompts())
    assert whole.threshold == pytest.approx(np.percentile(np.linspace(0.0, 0.5, 50), 90.0), abs=1e-4)


@pytest.mark.parametrize("threshold", [4.5, 100.0])
def test_a_cosine_threshold_outside_0_4_is_refused(tmp_path, threshold):
    run = _run_with_validation(tmp_path, np.array([0.1, 0.2]))
    with pytest.raises(UserError, match=r"lie in \[0, 4\]"):
        calibrate_guard(run, RoutingConfig(guard_threshold=threshold))


@pytest.mark.parametrize("field, value, message", [("top_k", 0, "top_k"), ("temperature", 0.0, "temperature"),
                                                   ("guard_percentile", 0.0, "guard_percentile"),
                                                   ("guard_threshold", -1.0, "guard_threshold"),
                                                   ("guard_prompt_chars", 0, "guard_prompt_chars"),
                                                   ("out_of_domain", "drop", "out_of_domain")])
def test_bad_routing_settings_are_refused(field, value, message):
    with pytest.raises(UserError, match=message):
        RoutingConfig(**{field: value})


def test_a_percentile_of_too_few_validation_documents_warns(tmp_path, caplog):
    few = _run_with_validation(tmp_path / "few", np.linspace(0.0, 0.5, 10))
    with caplog.at_level("WARNING", logger="upcycle.introvert.router"):
        calibrate_guard(few, RoutingConfig(guard_percentile=99.0))
    assert "from 10 validation documents, so expect about 9 % of in-domain requests" in caplog.text
    caplog.clear()
    many = _run_with_validation(tmp_path / "many", np.linspace(0.0, 0.5, 400))
    with caplog.at_level("WARNING", logger="upcycle.introvert.router"):
        calibrate_guard(many, RoutingConfig(guard_percentile=99.0))
        calibrate_guard(few, RoutingConfig(guard_percentile=80.0))  # 1/11 against 20 %: meaningful
    assert caplog.text == ""
