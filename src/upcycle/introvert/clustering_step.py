"""`upcycle cluster`: embed the corpus, fit K centroids on the training split, label every document.

Writes RUN/run.json and RUN/clusters/ (centroids, assignments, the fitted embedder, per-split embeddings so other
K can be fitted without embedding again, each document's own cluster, and a readable summary). Rerunning with the
same settings reuses what is there.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from upcycle.data import SplitConfig, load_documents, split_documents
from upcycle.errors import UserError
from upcycle.introvert.data import DOCUMENT_CLUSTERS
from upcycle.introvert.run import Run
from upcycle.io import atomic_directory, ensure_writable_dir, write_json

log = logging.getLogger(__name__)
EMBEDDINGS = "embeddings"  # clusters/embeddings/{train,validation,test}.npy


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
            raise UserError(f"--clusters must be >= 1, got {self.clusters}")
        if self.metric not in ("cosine", "l2"):
            raise UserError(f"--metric {self.metric}: choose cosine or l2")


def cluster_corpus(out: str | Path, data: str, base: str, config: ClusterConfig, splits: SplitConfig,
                   text_field: str = "text", command: str = "") -> Run:
    """Run the clustering step into `out` (see module docstring)."""
    from upcycle.introvert.embedding import make_embedder

    out = ensure_writable_dir(out)
    docs = split_documents(load_documents(data, text_field=text_field), splits)
    if len(docs["train"]) < config.clusters:
        raise UserError(f"--data {data}: {len(docs['train'])} training documents but --clusters {config.clusters}; "
                        f"use --clusters <= {len(docs['train'])} or add data")
    if (out / "run.json").is_file():
        meta = Run(out).meta
        if meta.get("clusters", {}).get("config") == asdict(config) and meta.get("data") == data \
                and (out / "clusters" / DOCUMENT_CLUSTERS).is_file():
            log.info("clusters already fitted in %s; reusing them", out)
            return Run(out)
        if (out / "experts").is_dir() and any((out / "experts").iterdir()):
            raise UserError(f"{out} already holds experts trained on other clusters; choose a new --out")
    run = Run.create(out, data=data, text_field=text_field, base=base, splits=asdict(splits))
    embedder = make_embedder(config.embedder, **({"base": base} if config.embedder == "hidden" else {}))
    embedder.fit([d.text for d in docs["train"]])
    embeddings = {name: embedder.encode([d.text for d in split], progress=_show_progress())
                  for name, split in docs.items()}
    with atomic_directory(run.clusters_dir) as tmp:
        embedder.save(tmp / "embedder")
        (tmp / EMBEDDINGS).mkdir()
        for name, matrix in embeddings.items():
            np.save(tmp / EMBEDDINGS / f"{name}.npy", matrix)
        sizes = fit_and_label(tmp, docs, embeddings, config, config.embedder)
    run.update_meta(clusters={"k": config.clusters, "embedder": config.embedder, "metric": config.metric,
                              "sizes": sizes, "config": asdict(config)},
                    commands=[command] if command else [])
    return run


def fit_and_label(directory: Path, docs: dict, embeddings: dict[str, np.ndarray], config: ClusterConfig,
                  embedder: str) -> list[int]:
    """Fit k-means on the training embeddings and write centroids, labels and summary into `directory`."""
    from upcycle.introvert.cluster_summary import write_summary
    from upcycle.introvert.clustering import fit_kmeans
    from upcycle.introvert.router import CentroidRouter

    fitted = replace(fit_kmeans(embeddings["train"], config.clusters, metric=config.metric,
                                balanced=config.balanced, seed=config.seed), embedder=embedder)
    fitted.save(directory, [d.id for d in docs["train"]])
    router = CentroidRouter(fitted.centroids, config.metric)
    labels = {"train": {d.id: int(c) for d, c in zip(docs["train"], fitted.assignments)}}
    for name in ("validation", "test"):
        own = router.route(embeddings[name])[0] if docs[name] else []
        labels[name] = {d.id: int(c) for d, c in zip(docs[name], own)}
    write_json(directory / DOCUMENT_CLUSTERS, labels)
    write_summary(directory, [d.text for d in docs["train"]], [d.id for d in docs["train"]], fitted)
    return np.bincount(fitted.assignments, minlength=config.clusters).tolist()


def _show_progress() -> bool:
    import os

    return not os.environ.get("UPCYCLE_NO_PROGRESS")


def refit_clusters(parent: Run, out: Path, config: ClusterConfig) -> Run:
    """A new run in `out` sharing `parent`'s data, base and embeddings, with clusters refitted for `config`."""
    meta = parent.meta
    docs = split_documents(load_documents(meta["data"], text_field=meta.get("text_field", "text")),
                           SplitConfig(**meta["splits"]))
    embeddings = {name: np.load(parent.clusters_dir / EMBEDDINGS / f"{name}.npy") for name in docs}
    run = Run.create(out, data=meta["data"], text_field=meta.get("text_field", "text"), base=meta["base"],
                     splits=meta["splits"], parent=str(parent.path))
    with atomic_directory(run.clusters_dir) as tmp:
        shutil.copytree(parent.clusters_dir / "embedder", tmp / "embedder")
        sizes = fit_and_label(tmp, docs, embeddings, config, meta["clusters"]["embedder"])
    run.update_meta(clusters={"k": config.clusters, "embedder": meta["clusters"]["embedder"],
                              "metric": config.metric, "sizes": sizes, "config": asdict(config)})
    return run
