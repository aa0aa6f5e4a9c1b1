"""Corpus sources, deterministic splits, tokenisation and packing."""

from upcycle.data.corpus import Document, load_documents
from upcycle.data.splits import SplitConfig, split_documents, split_of

__all__ = ["Document", "SplitConfig", "load_documents", "split_documents", "split_of"]
