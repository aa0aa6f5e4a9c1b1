"""Deterministic train / validation / test split by a hash of each document's text.

A document's split depends only on its text: sha256(text) read as an integer, modulo 10,000, compared with the
cumulative fractions. The same text always lands in the same split, on every machine and in every run, and exact
duplicates can never straddle two splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from upcycle.data.corpus import Document
from upcycle.errors import UserError

SPLITS = ("train", "validation", "test")
_BUCKETS = 10_000


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of documents held out; the rest is training data."""

    validation: float = 0.05
    """Fraction of documents for validation (model selection, early stopping)."""
    test: float = 0.05
    """Fraction of documents for the final test numbers; never used to choose settings."""

    def __post_init__(self) -> None:
        if not (0 <= self.validation < 1 and 0 <= self.test < 1 and self.validation + self.test < 1):
            raise UserError("split fractions must be in [0, 1) and sum to less than 1")


def split_of(doc: Document, config: SplitConfig = SplitConfig()) -> str:
    """Name of the split that `doc` belongs to."""
    bucket = int.from_bytes(hashlib.sha256(doc.text.encode("utf-8")).digest()[:8], "big") % _BUCKETS
    if bucket < config.test * _BUCKETS:
        return "test"
    if bucket < (config.test + config.validation) * _BUCKETS:
        return "validation"
    return "train"


def split_documents(docs: list[Document], config: SplitConfig = SplitConfig()) -> dict[str, list[Document]]:
    """Partition `docs` into the three splits, keeping corpus order inside each and dropping exact duplicates."""
    out: dict[str, list[Document]] = {name: [] for name in SPLITS}
    seen: set[str] = set()
    for doc in docs:
        if doc.text in seen:
            continue
        seen.add(doc.text)
        out[split_of(doc, config)].append(doc)
    return out
