"""The sequence router of a run: embed a whole request, then nearest cluster centroid (or a c-BTM top-k mixture)."""

from __future__ import annotations

import numpy as np

from upcycle.introvert.run import Run, expert_id


class EmbeddingRouter:
    """Routes whole texts to experts: `route(texts) -> expert ids`. Never per token; outputs are never mixed.

    It is what `upcycle.serving.router.ExpertRouter` asks of a router, so the server's model "auto" can use it.
    """

    def __init__(self, embedder, centroid_router):
        self.embedder = embedder
        self.centroid_router = centroid_router

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

    def mixture(self, texts: list[str], top_k: int = 2, temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """c-BTM mixing: the top-k clusters of each text and weights softmax(-d^2 / T) over them."""
        return self.centroid_router.mixture(self.embedder.encode(list(texts)), top_k, temperature)


def load_sequence_router(run: Run) -> EmbeddingRouter:
    """The run's embedder and centroids, ready to route."""
    from upcycle.introvert.embedding import load_embedder
    from upcycle.introvert.router import CentroidRouter

    return EmbeddingRouter(load_embedder(run.clusters_dir / "embedder"), CentroidRouter.load(run.clusters_dir))


def router_for_run(run_path: str) -> EmbeddingRouter:
    """The router of the run at `run_path` (a `--router` factory; `upcycle serve` uses the run's own by default)."""
    return load_sequence_router(Run.open(run_path))
