"""Sequence-level routing for MoIN: each whole document goes to its nearest cluster centroid (one expert).

`CentroidRouter` searches centroids for embeddings; `EmbeddingRouter` is a run's router: it embeds whole texts with
the run's embedder first (`load_sequence_router`).

`CentroidRouter.route` is the MoIN rule (never per token, outputs never mixed); `mixture` is c-BTM's top-k rule with
weights softmax(−d² / T) over the k nearest centroids. Both search a FAISS flat (exact) index built once.

Distances are squared L2 for both metrics; for cosine they are taken between unit vectors, ‖q̂ − ĉ‖² = 2 − 2·cos,
so the nearest centroid is the most similar one and d² lies in [0, 4].

Shapes: N queries, K centroids (experts), D embedding width, k experts chosen per query.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from upcycle.errors import UserError
from upcycle.introvert.clustering.clusters import Clusters, as_points, check_metric
from upcycle.introvert.config import RoutingConfig
from upcycle.introvert.run import SPLIT_EMBEDDINGS, Run, expert_id

log = logging.getLogger(__name__)

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
        ids, distances = self.search(embeddings, 1)  # [N, 1] each
        return ids[:, 0], distances[:, 0]

    def mixture(self, embeddings: np.ndarray, top_k: int, temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """c-BTM: the `top_k` nearest centroids ([N, k] int64, nearest first) and weights softmax(−d² / T) [N, k]."""
        if not 1 <= top_k <= self.num_experts:
            raise UserError(f"top_k must be between 1 and the number of experts ({self.num_experts}), got {top_k}")
        if not temperature > 0:
            raise UserError(f"the mixture temperature must be > 0, got {temperature}")
        ids, distances = self.search(embeddings, top_k)  # [N, k] each, ascending distance
        return ids, mixture_weights(distances, temperature).astype(np.float32)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest centroids of each query: ([N, k] int64 ids, [N, k] float32 squared distances)."""
        queries = as_points(embeddings, self.metric)  # [N, D]
        if queries.shape[1] != self.dim:
            raise UserError(f"embeddings are {queries.shape[1]} wide but the router's centroids are {self.dim} wide; "
                            "embed with the embedder the clusters were fitted with")
        with _faiss_threads(1 if len(queries) < _SINGLE_THREAD_BELOW else None):
            scores, ids = self.index.search(queries, k)  # [N, k]: inner products (cosine) or squared distances (l2)
        distances = np.maximum(2.0 - 2.0 * scores, 0.0) if self.metric == "cosine" else scores
        return ids.astype(np.int64), distances.astype(np.float32)


@dataclass(frozen=True)
class Route:
    """Where one request goes: its clusters (nearest first) with mixture weights, or none (the base model)."""

    clusters: tuple[int, ...]
    """Cluster indices whose experts are mixed, nearest first; empty when the guard sends the request to the base."""
    weights: tuple[float, ...]
    """Mixture weight of each cluster (they sum to 1)."""
    distance: float
    """Squared distance to the nearest centroid."""
    in_domain: bool
    """Whether `distance` is within the guard's threshold (always True without a guard)."""
    confidence: float | None
    """Share of the validation documents that lie at least this far from their own nearest centroid: near 1 for a
    typical in-domain request, near 0 beyond all of them (None without a calibrated guard)."""

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(expert_id(c) for c in self.clusters)


@dataclass(frozen=True)
class Guard:
    """The out-of-domain guard: a threshold on the squared distance to the nearest centroid, calibrated on the
    validation documents' own distances (`calibrate_guard`)."""

    threshold: float
    validation_distances: np.ndarray
    """Sorted squared distances of the validation documents to their nearest centroid (for `Route.confidence`)."""

    def confidence(self, distance: float) -> float | None:
        if not len(self.validation_distances):
            return None
        below = np.searchsorted(self.validation_distances, distance, side="left")
        return float(1.0 - below / len(self.validation_distances))


class EmbeddingRouter:
    """Routes whole texts to experts: `route(texts) -> expert ids`. Never per token.

    It is what `upcycle.serving.router.ExpertRouter` asks of a router, so the server's model "auto" can use it.
    `decide` adds c-BTM's top-k mixture and the out-of-domain guard (`RoutingConfig`).
    """

    def __init__(self, embedder, centroid_router: CentroidRouter, config: RoutingConfig | None = None,
                 guard: Guard | None = None):
        self.embedder = embedder
        self.centroid_router = centroid_router
        self.config = config or RoutingConfig(guard_percentile=None)
        self.guard = guard

    @property
    def experts(self) -> list[str]:
        """The expert id of every centroid."""
        return [expert_id(c) for c in range(self.centroid_router.num_experts)]

    def clusters(self, texts: list[str]) -> np.ndarray:
        """Nearest-centroid cluster index of each text."""
        ids, _ = self.centroid_router.route(self.embedder.encode(list(texts)))
        return np.asarray(ids)

    def route(self, texts: list[str]) -> list[str]:
        """The expert id for each text."""
        return [expert_id(int(c)) for c in self.clusters(texts)]

    def decide(self, texts: list[str], top_k: int | None = None) -> list[Route]:
        """The route of each text under `self.config`, with `top_k` overriding the config's k.

        In domain: the k nearest experts, weighted softmax(-d² / T). Beyond the guard's threshold: the base model,
        or with out_of_domain='mixture' the max(k, 2) nearest experts.
        """
        config, experts = self.config, self.centroid_router.num_experts
        k = config.top_k if top_k is None else top_k
        if not 1 <= k <= experts:
            raise UserError(f"top_k must be between 1 and the number of experts ({experts}), got {k}")
        outside_k = min(max(k, 2), experts) if config.out_of_domain == "mixture" else 0
        ids, distances = self.centroid_router.search(self.embedder.encode(list(texts)), max(k, outside_k))
        routes = []
        for row_ids, row_distances in zip(ids, distances):
            nearest = float(row_distances[0])
            inside = self.guard is None or nearest <= self.guard.threshold
            take = k if inside else outside_k
            weights = mixture_weights(row_distances[None, :take], config.temperature)[0] if take else ()
            routes.append(Route(tuple(int(c) for c in row_ids[:take]), tuple(float(w) for w in weights), nearest,
                                inside, self.guard.confidence(nearest) if self.guard else None))
        return routes


def calibrate_guard(run: Run, config: RoutingConfig, centroids: CentroidRouter | None = None,
                    embedder=None) -> Guard | None:
    """The guard of `run` under `config`: a fixed threshold, or the `guard_percentile`-th percentile of the
    validation documents' distances to their nearest centroid.

    The guard is calibrated on what it will judge. Given the run's `embedder`, the validation documents are embedded
    as requests are, cut to their first `config.guard_prompt_chars` characters; without one (add-data judges whole
    new documents), the whole documents' embeddings saved by the cluster step are used.
    `centroids`: the run's CentroidRouter when the caller has it already (default: loaded from clusters/)."""
    if config.guard_threshold is None and config.guard_percentile is None:
        return None
    centroids = centroids or CentroidRouter.load(run.clusters_dir)
    if config.guard_threshold is not None and centroids.metric == "cosine" and not 0 <= config.guard_threshold <= 4:
        raise UserError(f"--routing.guard_threshold {config.guard_threshold}: for the cosine metric squared "
                        "distances lie in [0, 4]; choose a threshold inside that range")
    validation = _validation_embeddings(run, centroids.dim, embedder, config.guard_prompt_chars)
    distances = np.sort(centroids.route(validation)[1]) if len(validation) else np.zeros(0, np.float32)
    if config.guard_threshold is not None:
        return Guard(float(config.guard_threshold), distances)
    if not len(distances):
        raise UserError(f"{run.path}: the guard is calibrated on validation documents, but this run has none; "
                        "give --routing.guard_threshold or --routing.guard_percentile null")
    _warn_if_too_few(len(distances), config.guard_percentile, run)
    return Guard(float(np.percentile(distances, config.guard_percentile)), distances)


def _warn_if_too_few(n: int, percentile: float, run: Run) -> None:
    """A percentile of n documents cannot flag fewer than about 1 / (n + 1) of in-domain requests: a new in-domain
    request is as likely to be the farthest of n + 1 as any other. Measured on a one-domain run with 10 validation
    documents, a 99th-percentile guard flagged 2 of 15 in-domain test documents."""
    floor = 1.0 / (n + 1)
    if floor > 2 * (1.0 - percentile / 100.0):
        log.warning("%s: the guard's %gth percentile comes from %d validation documents, so expect about %.0f %% of "
                    "in-domain requests beyond it, not %.2g %%; more validation documents (--splits.validation) or "
                    "a lower --routing.guard_percentile make it mean what it says", run.path, percentile, n,
                    100 * floor, 100 - percentile)


def _validation_embeddings(run: Run, dim: int, embedder, prompt_chars: int | None) -> np.ndarray:
    """[N, D] embeddings of the run's validation documents: of their first `prompt_chars` characters by `embedder`,
    or (either of them None) of the whole documents, as the cluster step saved them."""
    if embedder is not None and prompt_chars is not None:
        from upcycle.introvert.data import load_run_data

        prompts = [d.text[:prompt_chars] for d in load_run_data(run).docs("validation")]
        return embedder.encode(prompts) if prompts else np.zeros((0, dim), np.float32)
    saved = run.clusters_dir / SPLIT_EMBEDDINGS / "validation.npy"
    return np.load(saved) if saved.is_file() else np.zeros((0, dim), np.float32)


def load_sequence_router(run: Run, config: RoutingConfig | None = None) -> EmbeddingRouter:
    """The run's embedder and centroids, ready to route under `config` (None: top-1 with no guard)."""
    from upcycle.introvert.embedding import load_embedder

    config = config or RoutingConfig(guard_percentile=None)
    centroids, embedder = CentroidRouter.load(run.clusters_dir), load_embedder(run.clusters_dir / "embedder")
    return EmbeddingRouter(embedder, centroids, config, calibrate_guard(run, config, centroids, embedder))


def router_for_run(run_path: str) -> EmbeddingRouter:
    """The router of the run at `run_path` (a `--router` factory; `upcycle serve` uses the run's own by default)."""
    return load_sequence_router(Run.open(run_path))


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


def mixture_weights(distances: np.ndarray, temperature: float) -> np.ndarray:
    """c-BTM's weights softmax(−d² / T) over each row of squared distances [N, k], in float64."""
    return _softmax(-np.asarray(distances, np.float64) / temperature)


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
