"""The routing rows of `upcycle introvert evaluate`: c-BTM's top-k mixtures and the out-of-domain guard.

- routed-top{k}: each document is scored by the mixture of the k experts nearest to its prompt, per token
  log p(x_t) = logsumexp_i(log w_i + log p_i(x_t)) with w = softmax(−d² / T) fixed per document. T is chosen per k
  on the validation split from `EvalConfig.temperatures` (lowest validation perplexity), never on test.
- guarded-base / guarded-mixture: top-1 routing with the out-of-domain guard (threshold calibrated on validation,
  `calibrate_guard`); a prompt beyond it goes to the base, or to the top-2 mixture at the T chosen for k = 2.

Every route comes from `EmbeddingRouter.decide`, the code serving routes with; the prompts are embedded once and
routed under each setting by a centroid search alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from upcycle.errors import UserError
from upcycle.eval.stats import token_perplexity
from upcycle.introvert.config import RoutingConfig
from upcycle.introvert.model import IntrovertExperts, mix_documents, route_members
from upcycle.introvert.router import EmbeddingRouter, Guard, Route

Members = list[list[tuple[str, float]]]  # per document: (expert, weight) of its mixture; [("base", 1.0)] for the base


class _Embedded:
    """An embedder answering from embeddings computed once (evaluation routes the same prompts many times)."""

    def __init__(self, texts: Sequence[str], vectors: np.ndarray):
        self.rows = {text: row for row, text in enumerate(texts)}
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.vectors[[self.rows[text] for text in texts]]


class PromptRoutes:
    """Routes one fixed list of prompts under many settings with `EmbeddingRouter.decide`, embedding them once."""

    def __init__(self, router: EmbeddingRouter, prompts: Sequence[str]):
        start = time.perf_counter()
        self.prompts = list(prompts)
        self._embedded = _Embedded(self.prompts, router.embedder.encode(self.prompts) if self.prompts else None)
        self.centroid_router = router.centroid_router
        self.top1 = self.routes(1) if self.prompts else []
        self.seconds = time.perf_counter() - start
        """Embedding and top-1 search of all the prompts: what routing them costs."""

    def routes(self, top_k: int, temperature: float = 1.0, guard: Guard | None = None,
               out_of_domain: str = "base") -> list[Route]:
        """The route of every prompt: its top_k nearest experts weighted softmax(−d² / T), under `guard`."""
        if not self.prompts:
            return []
        config = RoutingConfig(top_k=top_k, temperature=temperature, guard_percentile=None,
                               out_of_domain=out_of_domain)
        return EmbeddingRouter(self._embedded, self.centroid_router, config, guard).decide(self.prompts)

    def members(self, top_k: int, temperature: float = 1.0, guard: Guard | None = None,
                out_of_domain: str = "base") -> Members:
        """(expert, weight) pairs of each prompt's route (see `routes`)."""
        return [route_members(r) for r in self.routes(top_k, temperature, guard, out_of_domain)]


def wanted_experts(*member_sets: Members, extra: Sequence[set[str]] | None = None) -> list[set[str]]:
    """Per document, every expert that one of the mixtures (or `extra`) needs scored."""
    n = len(member_sets[0]) if member_sets else len(extra or [])
    wanted = [set(extra[i]) if extra else set() for i in range(n)]
    for members in member_sets:
        for i, mixture in enumerate(members):
            wanted[i].update(expert for expert, _ in mixture)
    return wanted


def choose_temperatures(experts: IntrovertExperts, ids: list, prompts: PromptRoutes, top_ks: Sequence[int],
                        temperatures: Sequence[float], batch_size: int) -> tuple[dict[int, float], dict]:
    """For each k > 1 the temperature whose top-k mixture has the lowest perplexity on these (validation) documents,
    and the record of the whole grid."""
    ks = [k for k in top_ks if k > 1]
    if not ks:
        return {}, {"chosen": {}, "validation_perplexity": {}, "validation_documents": len(ids)}
    if not ids:
        if len(temperatures) > 1:
            raise UserError("--eval.temperatures: the mixture temperature is chosen on the validation split, which is "
                            "empty in this run; give a single temperature")
        return {k: temperatures[0] for k in ks}, {"chosen": {str(k): temperatures[0] for k in ks},
                                                  "validation_perplexity": {}, "validation_documents": 0}
    grid = {(k, t): prompts.members(k, t) for k in ks for t in temperatures}
    scored = experts.token_log_probs(ids, wanted_experts(*grid.values()), batch_size=batch_size)
    perplexity = {key: token_perplexity(*mix_documents(scored, members)) for key, members in grid.items()}
    chosen = {k: min(temperatures, key=lambda t: (perplexity[k, t], t)) for k in ks}
    return chosen, {"chosen": {str(k): t for k, t in chosen.items()},
                    "validation_perplexity": {str(k): {str(t): perplexity[k, t] for t in temperatures} for k in ks},
                    "validation_documents": len(ids)}


def guarded_members(prompts: PromptRoutes, guard: Guard, temperature: float) -> dict[str, Members]:
    """Top-1 routing under the guard, beyond it the base ('guarded-base') or the top-2 mixture ('guarded-mixture')."""
    return {f"guarded-{where}": prompts.members(1, temperature, guard, where) for where in ("base", "mixture")}


def nearest_distances(prompts: PromptRoutes) -> np.ndarray:
    """[N] squared distance of each prompt to its nearest centroid (what the guard compares to its threshold)."""
    return np.array([route.distance for route in prompts.top1])
