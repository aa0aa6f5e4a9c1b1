"""The documents of a run, split and labelled with their own cluster, shared by training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

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


_CACHE: dict[tuple[str, float], RunData] = {}
_CACHE_SIZE = 4


def load_run_data(run: Run) -> RunData:
    """Load (and cache per process, by run directory and labels file version) the run's documents and clusters."""
    labels = run.clusters_dir / DOCUMENT_CLUSTERS
    key = (str(run.path.resolve()), labels.stat().st_mtime if labels.exists() else 0.0)
    if key not in _CACHE:
        meta = run.meta
        docs = load_documents(meta["data"], text_field=meta.get("text_field", "text"))
        splits = split_documents(docs, SplitConfig(**meta.get("splits", {})))
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest
        _CACHE[key] = RunData(splits=splits, own_cluster=read_json(labels))
    return _CACHE[key]
