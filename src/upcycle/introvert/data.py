"""The documents of a run, split and labelled with their own cluster, shared by training and evaluation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from upcycle.data import Document, SplitConfig, load_documents, split_documents
from upcycle.data.splits import SPLITS
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
        splits = run_splits(run.meta)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest
        _CACHE[key] = RunData(splits=splits, own_cluster=read_json(labels))
    return _CACHE[key]


def run_splits(meta: dict[str, Any]) -> dict[str, list[Document]]:
    """The run's documents per split: those it was built from, then each generation added by `add-data`, in order."""
    text_field, config = meta.get("text_field", "text"), SplitConfig(**meta.get("splits", {}))
    splits = split_documents(load_documents(meta["data"], text_field=text_field), config)
    for generation in meta.get("generations", [])[1:]:
        added = generation_splits(generation["data"], text_field, config, generation["generation"])
        splits = merge_splits(splits, added)
    return splits


def generation_splits(data: str, text_field: str, config: SplitConfig, generation: int) -> dict[str, list[Document]]:
    """The documents of `data` split as the run splits, their ids prefixed `g<generation>/` so that two sources'
    ids (both folders holding `a.py`, say) never clash."""
    docs = [Document(f"g{generation}/{d.id}", d.text) for d in load_documents(data, text_field=text_field)]
    return split_documents(docs, config)


def merge_splits(splits: dict[str, list[Document]], added: dict[str, list[Document]]) -> dict[str, list[Document]]:
    """`splits` followed by the documents of `added` whose text is not in the run already. A text's split depends on
    the text alone, so a duplicate would land in the split that holds it anyway."""
    seen = {d.text for docs in splits.values() for d in docs}
    return {name: splits[name] + [d for d in added[name] if d.text not in seen] for name in SPLITS}


def content_hash(splits: dict[str, list[Document]]) -> str:
    """SHA-256 over the sorted SHA-256s of the documents' texts: the same content gives the same hash whatever its
    file names, order or location."""
    digests = sorted(hashlib.sha256(d.text.encode("utf-8")).hexdigest() for docs in splits.values() for d in docs)
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()
