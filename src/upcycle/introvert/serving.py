"""An introvert run as a serving source: its base, its experts by id, and its centroid router.

`served_run` is the one adapter between the run directory and the method-agnostic serving stack
(`upcycle.serving.source.ServedModel`); `upcycle serve RUN` finds it through `serving.source.DEFAULT_SOURCE`.
Its router is the run's `EmbeddingRouter`, whose `decide` (top-k mixture, out-of-domain guard under the
`--routing.*` settings) answers serving's `MixingRouter` protocol: a `Route` has a `RouteDecision`'s fields.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upcycle.introvert.config import RoutingConfig
from upcycle.introvert.run import Run, expert_id
from upcycle.serving.source import ServedModel

if TYPE_CHECKING:
    from upcycle.introvert.router import EmbeddingRouter
    from upcycle.serving.config import EngineConfig
    from upcycle.serving.engine import Engine

SETTLE_S = 5.0
"""How long a new clusters/ must have been seen before the served router adopts it. `add-data` writes new experts
before the centroids that route to them, and `serve --watch` registers experts every 2 s (watch_interval_s): waiting
longer than that means a request is never routed to an expert the server does not hold yet."""


def served_run(run: Run | str | Path, router: bool = True, routing: RoutingConfig | None = None) -> ServedModel:
    """The run's base, {expert id: adapter dir} of its trained experts, and (when `router` and the run has
    centroids) its sequence router for model "auto", deciding under `routing` (None: the nearest expert, no guard)."""
    run = Run.of(run)
    routes = router and (run.clusters_dir / "centroids.npy").is_file()
    return ServedModel(base=run.base, experts={e: run.expert_dir(e) for e in run.expert_ids()},
                       router=ReloadingRouter(run, routing) if routes else None, experts_dir=run.experts_dir,
                       root=run.path)


class ReloadingRouter:
    """The run's sequence router, reloaded when `upcycle introvert add-data` replaces clusters/ (new or moved
    centroids), so that a running server routes to the new experts without a restart.

    Each call stats the centroids file (microseconds); a changed file is adopted `settle_s` after it was first seen.
    clusters/ is replaced by one rename, so a reload reads either the old directory or the new one, never a mix.
    Anything else (`decide`, `mixture`, `centroid_router`) is the current EmbeddingRouter's.
    """

    def __init__(self, run: Run, routing: RoutingConfig | None = None, settle_s: float = SETTLE_S) -> None:
        from upcycle.introvert.router import load_sequence_router

        self.run, self.settle_s = run, settle_s
        self._stamp = self._current_stamp()
        self._router: EmbeddingRouter = load_sequence_router(run, routing)
        self._seen: tuple[tuple[int, int] | None, float] | None = None  # (a newer stamp, when first seen)
        self._reloading = threading.Lock()

    @property
    def current(self) -> EmbeddingRouter:
        """The router of the newest settled clusters/."""
        stamp = self._current_stamp()
        if stamp is None or stamp == self._stamp:
            return self._router
        if self._seen is None or self._seen[0] != stamp:
            self._seen = (stamp, time.monotonic())
        if time.monotonic() - self._seen[1] >= self.settle_s and self._reloading.acquire(blocking=False):
            try:  # other threads keep routing with the old router meanwhile
                self._reload(stamp)
            finally:
                self._reloading.release()
        return self._router

    def _reload(self, stamp: tuple[int, int]) -> None:
        from upcycle.introvert.router import load_sequence_router

        self._router = load_sequence_router(self.run, self._router.config)
        self._stamp = stamp

    def _current_stamp(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.run.clusters_dir / "centroids.npy")
        except FileNotFoundError:  # between the two renames of a replacement: keep the router we have
            return None
        return status.st_ino, status.st_mtime_ns

    @property
    def experts(self) -> list[str]:
        return self.current.experts

    def route(self, texts: list[str]) -> list[str]:
        return self.current.route(texts)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("run", "settle_s"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.current, name)


def engine_for_run(run: Run | str | Path, config: EngineConfig | None = None) -> Engine:
    """A batching engine over the run's base with every trained expert registered (no router: see `served_run`)."""
    from upcycle.serving.engine import Engine

    served = served_run(run, router=False)
    return Engine.from_pretrained(served.base, served.experts, config)


def write_synthetic_run(run_dir: str | Path, base_dir: str | Path, n_experts: int, rank: int = 8,
                        lora_alpha: float = 16.0, targets: Sequence[str] | None = None, seed: int = 0,
                        b_std: float = 0.05, first_cluster: int = 0) -> Run:
    """Create (or extend) a run at `run_dir` for the base at `base_dir` with `n_experts` random LoRA experts
    (tests and benchmarks; no clusters, so no router)."""
    from upcycle.serving.synthetic import DEFAULT_TARGETS, write_synthetic_experts

    run_dir = Path(run_dir)
    run = Run.open(run_dir) if (run_dir / "run.json").is_file() else Run.create(run_dir, base=str(base_dir))
    write_synthetic_experts(run.experts_dir, base_dir, n_experts, rank=rank, lora_alpha=lora_alpha,
                            targets=targets or DEFAULT_TARGETS, seed=seed, b_std=b_std, first=first_cluster,
                            name=expert_id)
    return run
