"""`upcycle introvert cluster`: embed the corpus, fit K centroids on the training split, label every document.

Writes RUN/run.json and RUN/clusters/ (centroids, assignments, the fitted embedder, per-split embeddings so other
K can be fitted without embedding again, each document's own cluster, and a readable summary). Rerunning with the
same settings reuses what is there.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from upcycle.data import SplitConfig, load_documents, split_documents
from upcycle.data.splits import SPLITS
from upcycle.errors import UserError
from upcycle.introvert.config import ClusterConfig
from upcycle.introvert.data import DOCUMENT_CLUSTERS
from upcycle.introvert.run import SPLIT_EMBEDDINGS as EMBEDDINGS
from upcycle.introvert.run import Run
from upcycle.io import atomic_directory, check_writable, ensure_writable_dir, read_json, write_json

log = logging.getLogger(__name__)


def cluster_corpus(out: str | Path, data: str, base: str, config: ClusterConfig, splits: SplitConfig,
                   text_field: str = "text", command: str = "") -> Run:
    """Run the clustering step into `out` (see module docstring).

    Everything that can be refused is checked before anything is written: a foreign --out, an unwritable one,
    the embedder's name, the data. run.json is written last, once clusters/ is complete, so an interrupted or
    failed step (a full disk, say) leaves either the previous run or no run, never a run.json without clusters.
    """
    from upcycle.introvert.embedding import make_embedder

    out = Path(out)
    Run.check_new_location(out)
    check_writable(out, hint="choose another --out")
    embedder = make_embedder(config.embedder, **({"base": base} if config.embedder == "hidden" else {}))
    docs = split_documents(load_documents(data, text_field=text_field), splits)
    if len(docs["train"]) < config.clusters:
        raise UserError(f"--data {data}: {len(docs['train'])} training documents but --clustering.clusters "
                        f"{config.clusters}; use --clustering.clusters <= {len(docs['train'])} or add data")
    run = Run(ensure_writable_dir(out, hint="choose another --out"))
    settings = {"data": data, "text_field": text_field, "base": base, "splits": asdict(splits)}
    with run.lock("cluster"):
        Run.check_new_location(out)  # again under the lock: another process may have started a run meanwhile
        for path in run.remove_stale_temporaries():
            log.info("removed %s, left by an interrupted run", path)
        existing = run.meta if (out / "run.json").is_file() else None
        same = existing is not None and _same_settings(existing, settings, config)
        if same and clusters_complete(run, config):
            log.info("clusters already fitted in %s; reusing them", out)
            return run
        trained = run.expert_ids()
        if trained and not same:
            raise UserError(f"{out} already holds experts trained on other clusters, data or base; choose a new --out")
        # Same settings but clusters/ damaged (centroids deleted, say): fit again. The fit is deterministic, and
        # with experts on disk it must give back the clusters they were trained on, which the sizes check.
        meta = existing if same else Run.new_meta(**settings, commands=[command] if command else [])
        expected = existing["clusters"]["sizes"] if same and trained else None
        embedder.fit([d.text for d in docs["train"]])
        embeddings = {name: embedder.encode([d.text for d in split], progress=_show_progress())
                      for name, split in docs.items()}

        def save_inputs(folder: Path) -> None:
            embedder.save(folder / "embedder")
            (folder / EMBEDDINGS).mkdir()
            for name, matrix in embeddings.items():
                np.save(folder / EMBEDDINGS / f"{name}.npy", matrix)

        write_clusters(run, meta, docs, embeddings, config, config.embedder, save_inputs, expected)
    return run


def _same_settings(meta: dict, settings: dict, config: ClusterConfig) -> bool:
    """Whether run.json describes clusters fitted with `config` on the same data, splits and base."""
    recorded = {key: meta.get(key) for key in settings} | {"text_field": meta.get("text_field", "text")}
    return meta.get("clusters", {}).get("config") == asdict(config) and recorded == settings


def clusters_complete(run: Run, config: ClusterConfig) -> bool:
    """Whether clusters/ loads and was fitted with `config`: every file the later steps read is there."""
    from upcycle.introvert.clustering.clusters import CLUSTERS_FILE, Clusters
    from upcycle.introvert.embedding import load_embedder

    folder = run.clusters_dir
    needed = [DOCUMENT_CLUSTERS, *(f"{EMBEDDINGS}/{split}.npy" for split in SPLITS)]
    if not all((folder / name).is_file() for name in needed):
        return False
    try:
        Clusters.load(folder)
        load_embedder(folder / "embedder")
        saved = read_json(folder / CLUSTERS_FILE)
    except (UserError, OSError, ValueError):
        return False
    return (saved.get("k"), saved.get("metric"), saved.get("embedder"), bool(saved.get("balanced"))) == (
        config.clusters, config.metric, config.embedder, config.balanced)


def write_clusters(run: Run, meta: dict, docs: dict, embeddings: dict[str, np.ndarray], config: ClusterConfig,
                   embedder: str, save_inputs: Callable[[Path], None], expected_sizes: list[int] | None = None) -> None:
    """Fit and write clusters/ (atomically), then run.json describing it: both change, or neither does."""
    sizes: list[int] = []

    def describe() -> None:
        run.write_meta(meta | {"clusters": {"k": config.clusters, "embedder": embedder, "metric": config.metric,
                                            "sizes": sizes, "config": asdict(config)}})

    with atomic_directory(run.clusters_dir, commit=describe) as tmp:
        save_inputs(tmp)
        sizes.extend(fit_and_label(tmp, docs, embeddings, config, embedder))
        if expected_sizes is not None and sizes != expected_sizes:
            raise UserError(f"{run.path}: fitting the clusters again gave sizes {sizes}, but the experts were "
                            f"trained on clusters of sizes {expected_sizes}; choose a new --out")


def fit_and_label(directory: Path, docs: dict, embeddings: dict[str, np.ndarray], config: ClusterConfig,
                  embedder: str) -> list[int]:
    """Fit k-means on the training embeddings and write centroids, labels and summary into `directory`."""
    from upcycle.introvert.clustering.clusters import fit_kmeans

    fitted = replace(fit_kmeans(embeddings["train"], config.clusters, metric=config.metric,
                                balanced=config.balanced, seed=config.seed), embedder=embedder)
    write_labelled_clusters(directory, docs, embeddings, fitted)
    return np.bincount(fitted.assignments, minlength=config.clusters).tolist()


def write_labelled_clusters(directory: Path, docs: dict, embeddings: dict[str, np.ndarray], clusters) -> None:
    """Save `clusters` (fitted on docs["train"]), every document's own cluster (a held-out one: its nearest
    centroid) and the summary into `directory`."""
    from upcycle.introvert.clustering.summary import write_summary
    from upcycle.introvert.router import CentroidRouter

    train = docs["train"]
    clusters.save(directory, [d.id for d in train])
    router = CentroidRouter(clusters.centroids, clusters.metric)
    labels = {"train": {d.id: int(c) for d, c in zip(train, clusters.assignments, strict=True)}}
    for name in ("validation", "test"):
        own = router.route(embeddings[name])[0] if docs[name] else []
        labels[name] = {d.id: int(c) for d, c in zip(docs[name], own, strict=True)}
    write_json(directory / DOCUMENT_CLUSTERS, labels)
    write_summary(directory, [d.text for d in train], [d.id for d in train], clusters)


def _show_progress() -> bool:
    import os

    return not os.environ.get("UPCYCLE_NO_PROGRESS")


def refit_clusters(parent: Run, out: Path, config: ClusterConfig) -> Run:
    """A new run in `out` sharing `parent`'s data, base and embeddings, with clusters refitted for `config`."""
    from upcycle.introvert.data import run_splits

    meta = parent.meta
    docs = run_splits(meta)  # with every generation `add-data` added, as the saved embeddings are
    embeddings = {name: np.load(parent.clusters_dir / EMBEDDINGS / f"{name}.npy") for name in docs}
    run = Run(ensure_writable_dir(out))
    added = {"generations": meta["generations"]} if meta.get("generations") else {}
    child = Run.new_meta(data=meta["data"], text_field=meta.get("text_field", "text"), base=meta["base"],
                         splits=meta["splits"], parent=str(parent.path), **added)

    def save_inputs(folder: Path) -> None:  # the same inputs as the parent's: its embedder and split embeddings
        for name in ("embedder", EMBEDDINGS):
            shutil.copytree(parent.clusters_dir / name, folder / name)

    write_clusters(run, child, docs, embeddings, config, meta["clusters"]["embedder"], save_inputs)
    return run
