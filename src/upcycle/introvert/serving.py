"""An introvert run as a serving source: its base, its experts by id, and its centroid router.

`served_run` is the one adapter between the run directory and the method-agnostic serving stack
(`upcycle.serving.source.ServedModel`); `upcycle serve RUN` finds it through `serving.source.DEFAULT_SOURCE`.
Its router is the run's `EmbeddingRouter`, whose `decide` (top-k mixture, out-of-domain guard under the
`--routing.*` settings) answers serving's `MixingRouter` protocol: a `Route` has a `RouteDecision`'s fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.introvert.config import RoutingConfig
from upcycle.introvert.run import Run, expert_id
from upcycle.serving.source import ServedModel

if TYPE_CHECKING:
    from upcycle.serving.config import EngineConfig
    from upcycle.serving.engine import Engine


def served_run(run: Run | str | Path, router: bool = True, routing: RoutingConfig | None = None) -> ServedModel:
    """The run's base, {expert id: adapter dir} of its trained experts, and (when `router` and the run has
    centroids) its sequence router for model "auto", deciding under `routing` (None: the nearest expert, no guard)."""
    from upcycle.introvert.router import load_sequence_router

    run = Run.of(run)
    routes = router and (run.clusters_dir / "centroids.npy").is_file()
    return ServedModel(base=run.base, experts={e: run.expert_dir(e) for e in run.expert_ids()},
                       router=load_sequence_router(run, routing) if routes else None,
                       experts_dir=run.experts_dir, root=run.path)


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
