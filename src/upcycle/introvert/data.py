"""The documents of a run, split and labelled with their own cluster, shared by training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from upcycle.data import Document, SplitConfig, load_documents, split_documents
from upcycle.introvert.run import Run
from upcycle.io import read_json

DOCUMENT_CLUSTERS = "documents.json"  # clusters/documents.json: {"train": {doc id: cluster}, "validation": ..., ...}


@dataclass
class RunData:
    """The run's corpus: documents per split and each document's own cluster (from its full-text embedding)."""

    splits: dict[str, list[Document]]
    own_cluster: dict[str, dict[str, int]]

    def docs(self, split: str, cluster: int | None = None) -> list[Document]:
        """Documents of `split`, optionally only those whose own cluster is `cluster`."""
        docs = self.splits[split]
        if cluster is None:
            return docs
        labels = self.own_cluster[split]
        return [d for d in docs if labels.get(d.id) == cluster]


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> RunData:
    run = Run.open(path)
    meta = run.meta
    docs = load_documents(meta["data"], text_field=meta.get("text_field", "text"))
    splits = split_documents(docs, SplitConfig(**meta.get("splits", {})))
    return RunData(splits=splits, own_cluster=read_json(run.clusters_dir / DOCUMENT_CLUSTERS))


def load_run_data(run: Run) -> RunData:
    """Load (and cache per process) the run's documents and cluster labels."""
    labels = run.clusters_dir / DOCUMENT_CLUSTERS
    return _load(str(run.path.resolve()), labels.stat().st_mtime if labels.exists() else 0.0)
