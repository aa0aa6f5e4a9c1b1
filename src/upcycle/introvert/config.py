"""Typed settings of the introvert-experts (MoIN) pipeline: clustering, expert training, baselines and evaluation
(importable without torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from upcycle.data.splits import SPLITS
from upcycle.errors import UserError
from upcycle.serving.config import OUT_OF_DOMAIN, RoutingConfig  # noqa: F401 (re-exported, see below)
from upcycle.training.config import LoraSettings, TrainConfig

# RoutingConfig (--routing.*) is one setting group shared by `introvert evaluate` and `upcycle serve`; serving may not
# import a method, so its home is serving/config.py and it is re-exported here.


@dataclass
class ClusterConfig:
    """How documents are embedded and clustered."""

    clusters: int = 8
    """Number of clusters K (one expert each)."""
    embedder: str = "minilm"
    """Document embedding: 'minilm' (all-MiniLM-L6-v2), 'tfidf' (tf-idf + SVD, as c-BTM) or 'hidden' (the base's
    mean-pooled hidden states)."""
    metric: str = "cosine"
    """Distance for k-means and routing: 'cosine' or 'l2'."""
    balanced: bool = False
    """Cap every cluster at ceil(N / K) documents (balanced assignment, as c-BTM)."""
    seed: int = 0
    """k-means seed."""

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise UserError(f"--clustering.clusters must be >= 1, got {self.clusters}")
        if self.metric not in ("cosine", "l2"):
            raise UserError(f"--clustering.metric {self.metric}: choose cosine or l2")


@dataclass
class ExpertConfig:
    """How each expert is trained. Defaults were chosen on validation data for the shipped tiny base."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapter shape (rank, alpha, target modules)."""
    tokens_per_expert: int = 98_304
    """Training tokens per expert (a cluster smaller than this is seen several times)."""
    batch_size: int = 8
    """Blocks per optimizer step."""
    block_size: int = 256
    """Tokens per block."""
    lr: float = 2e-3
    """Peak learning rate; the default was the best of a validation sweep on the shipped base (docs/tuning.md)."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    seed: int = 0
    """Seed for block sampling; expert i uses seed + i."""

    def __post_init__(self) -> None:
        # Refused here, while the command line is parsed: later they divide by zero or silently train one step.
        if self.tokens_per_expert < 1:
            raise UserError(f"--expert.tokens_per_expert must be >= 1, got {self.tokens_per_expert}")
        if self.batch_size < 1:
            raise UserError(f"--expert.batch_size must be >= 1, got {self.batch_size}")
        if self.block_size < 2:  # a block of one token has nothing to predict
            raise UserError(f"--expert.block_size must be >= 2, got {self.block_size}")
        if not self.lr > 0:
            raise UserError(f"--expert.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise UserError(f"--expert.warmup_steps must be >= 0, got {self.warmup_steps}")

    def train_config(self, cluster: int) -> TrainConfig:
        steps = max(1, math.ceil(self.tokens_per_expert / (self.batch_size * self.block_size)))
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, steps - 1) or 1, seed=self.seed + cluster)


@dataclass
class BaselineConfig:
    """Settings of the baselines that are not copied from the experts' config."""

    lora_all_lr: float | None = 1e-3
    """Peak learning rate of the compute-matched single LoRA (None: the experts' lr). Each default below was the
    best of a validation sweep on the shipped base (docs/tuning.md), so every method gets its own tuned lr."""
    full_lr: float = 1e-4
    """Peak learning rate of continued full training."""
    wide_lr: float = 5e-4
    """Peak learning rate of the parameter-matched LoRA of rank K x r."""


@dataclass
class EvalConfig:
    """What `upcycle introvert evaluate` measures."""

    split: str = "test"
    """Split scored for the headline numbers ('validation' when choosing settings)."""
    route_chars: int = 1000
    """Characters of each document's beginning that the router sees (the 'prompt')."""
    max_tokens_per_doc: int = 1024
    """Tokens scored per document (its beginning), so long files do not dominate and evaluation stays fast."""
    baselines: bool = True
    """Score the lora-all, lora-wide and full baselines (trained beforehand by `upcycle introvert train-baselines`)."""
    batch_size: int = 16
    """Document blocks scored per forward (lower it if the logits of a large vocabulary do not fit in memory)."""
    best_expert_max_k: int = 32
    """Score every expert on every document (the 'best' upper bound) only up to this many clusters."""
    bootstrap: int = 1000
    """Bootstrap resamples of documents for the 95% confidence intervals."""
    seed: int = 0
    """Seed for random routing and the bootstrap."""
    top_ks: list[int] | None = None
    """Experts mixed per document in the routed top-k rows (c-BTM's mixture of the k experts nearest to the prompt).
    None: 1, 2 and 4, each capped at K; a k given here above K is refused."""
    temperatures: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    """Mixture temperatures T tried (weights softmax(-d² / T)); each top-k row uses the T with the lowest perplexity
    on the validation split, never chosen on test."""
    guard_percentile: float | None = 99.0
    """The out-of-domain guard scored: its threshold is this percentile of the validation documents' distances to
    their nearest centroid (as --routing.guard_percentile). None: no guard rows."""
    heldout_data: str | None = None
    """A corpus from a domain no cluster was built from (a folder, .txt/.jsonl/.parquet file or 'hf:NAME', read like
    --data); its documents of `split` (split as the run's data) are scored with and without the guard."""
    reference_run: str | None = None
    """Another run of the same base over the same documents, e.g. the corpus rebuilt from scratch where this run
    grew with `add-data`: its routed top-1 is scored on this run's documents as 'reference', with a paired interval
    against 'routed'. Its splits must be this run's, so that none of these documents trained its experts."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """Baseline training settings: what `upcycle demo` trains the baselines with before it evaluates
    (`upcycle introvert train-baselines` takes them as --baseline.*); evaluation itself trains nothing."""

    def __post_init__(self) -> None:
        # Refused while parsing, before anything is loaded: later they fail mid-way or score nothing.
        if self.split not in SPLITS:
            raise UserError(f"--eval.split {self.split}: choose one of {', '.join(SPLITS)}")
        for name in ("route_chars", "max_tokens_per_doc", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise UserError(f"--eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.best_expert_max_k < 0:
            raise UserError(f"--eval.best_expert_max_k must be >= 0, got {self.best_expert_max_k}")
        if self.top_ks is not None and (not self.top_ks or min(self.top_ks) < 1):
            raise UserError(f"--eval.top_ks must be a non-empty list of values >= 1, got {self.top_ks}")
        if not self.temperatures or not min(self.temperatures) > 0:
            raise UserError(f"--eval.temperatures must be a non-empty list of values > 0, got {self.temperatures}")
        if self.guard_percentile is not None and not 0 < self.guard_percentile <= 100:
            raise UserError(f"--eval.guard_percentile must be in (0, 100], got {self.guard_percentile}")

    def top_ks_for(self, clusters: int) -> list[int]:
        """The k values to score for a run of `clusters` experts (the default's capped at K; given ones checked)."""
        if self.top_ks is None:
            return sorted({min(k, clusters) for k in (1, 2, 4)})
        if max(self.top_ks) > clusters:
            raise UserError(f"--eval.top_ks {max(self.top_ks)}: top_k must be between 1 and the number of experts "
                            f"({clusters})")
        return sorted(set(self.top_ks))


@dataclass
class AddConfig:
    """How `upcycle introvert add-data` grows a run with a new generation of documents."""

    guard_percentile: float | None = 99.0
    """A new training document joins its nearest cluster when its squared distance is within the out-of-domain
    guard's threshold: this percentile of the validation documents' distances (as --routing.guard_percentile)."""
    guard_threshold: float | None = None
    """A fixed threshold on the squared distance instead of the calibrated one (cosine: within [0, 4])."""
    new_clusters: int | None = None
    """Clusters to fit on the documents beyond the threshold (None: about the mean size of the existing clusters)."""
    min_cluster_documents: int = 8
    """Fewer documents than this beyond the threshold form no new cluster: they join their nearest one instead."""
    grow_fraction: float = 0.2
    """An existing cluster whose training documents grew by more than this fraction gets its expert continued."""

    def __post_init__(self) -> None:
        if self.guard_percentile is None and self.guard_threshold is None:
            raise UserError("--add.guard_percentile and --add.guard_threshold are both null; give one of them")
        if self.guard_percentile is not None and not 0 < self.guard_percentile <= 100:
            raise UserError(f"--add.guard_percentile must be in (0, 100], got {self.guard_percentile}")
        if self.guard_threshold is not None and not self.guard_threshold >= 0:
            raise UserError(f"--add.guard_threshold must be >= 0, got {self.guard_threshold}")
        if self.new_clusters is not None and self.new_clusters < 0:
            raise UserError(f"--add.new_clusters must be >= 0, got {self.new_clusters}")
        if self.min_cluster_documents < 1:
            raise UserError(f"--add.min_cluster_documents must be >= 1, got {self.min_cluster_documents}")
        if not self.grow_fraction >= 0:
            raise UserError(f"--add.grow_fraction must be >= 0, got {self.grow_fraction}")

    def routing(self) -> RoutingConfig:
        """The guard settings as a RoutingConfig (what `calibrate_guard` takes)."""
        return RoutingConfig(guard_percentile=self.guard_percentile, guard_threshold=self.guard_threshold)
