"""Corpus sources, deterministic splits, tokenisation and packing, instruction mixtures.

Reading order:
- `corpus`, `splits`      documents from a directory, file, HF dataset or the embedded default; a hash split
- `packing`, `blocks`     tokenise and pack into blocks; corpus -> split -> token blocks, the path every method takes
- `instructions`          (task, prompt, response) mixtures for the Flan-MoE experiment
- `system_docs`, `commands`   a multi-domain corpus built from installed documentation, and its CLI
"""

from upcycle.data.corpus import Document, load_documents
from upcycle.data.splits import SplitConfig, split_documents, split_of

__all__ = ["Document", "SplitConfig", "load_documents", "split_documents", "split_of"]
