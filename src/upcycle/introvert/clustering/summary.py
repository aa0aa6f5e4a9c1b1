"""What each cluster is about: its size, its most distinctive terms and the documents nearest its centroid.

Top terms are class-based tf-idf (c-TF-IDF, as BERTopic): each cluster's documents count as one class document, and a
term scores  tf(t, c) / words(c) · log(1 + A / f(t)),  with A the mean number of words per cluster and f(t) the
term's count over all clusters, so words common everywhere (`self`, `return`) sink and a cluster's own words rise.
Tokens are identifiers and words of at least 3 characters that start with a letter or underscore, less English stop
words and Python keywords; shorter code tokens (`i`, `x`, `if`, `os`) say little about a topic.

Writes summary.json (a list of per-cluster records) and summary.md (a table), each atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from upcycle.introvert.clustering.clusters import Clusters
from upcycle.io import atomic_write_text, ensure_writable_dir, write_json

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
TOKEN_PATTERN = r"(?u)\b[^\W\d]\w{2,}\b"  # a letter or underscore, then 2+ word characters


def stop_words() -> frozenset[str]:
    """English function words and Python keywords: frequent in every cluster of code or prose, topical in none."""
    import keyword

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | {w.lower() for w in keyword.kwlist} | {"self", "cls"}


@dataclass
class ClusterSummary:
    """One cluster in words."""

    cluster: int
    size: int
    top_terms: list[str]
    """Most distinctive terms first (c-TF-IDF)."""
    examples: list[str]
    """Ids of the cluster's documents nearest its centroid, nearest first."""
    mean_distance: float | None
    """Mean squared distance of the cluster's documents to its centroid (None when empty)."""


def summarize_clusters(texts: Sequence[str], doc_ids: Sequence[str], clusters: Clusters, *, terms: int = 10,
                       examples: int = 3) -> list[ClusterSummary]:
    """One summary per cluster of `clusters`, whose assignments follow the order of `texts` / `doc_ids`."""
    if not len(texts) == len(doc_ids) == len(clusters.assignments):
        raise ValueError(f"{len(texts)} texts, {len(doc_ids)} ids and {len(clusters.assignments)} assignments")
    top = top_terms(texts, clusters.assignments, clusters.k, terms)
    nearest = _nearest_documents(clusters, examples)
    sizes = clusters.sizes
    summaries = []
    for c in range(clusters.k):
        members = clusters.distances[clusters.assignments == c]
        summaries.append(ClusterSummary(cluster=c, size=int(sizes[c]), top_terms=top[c],
                                        examples=[doc_ids[i] for i in nearest[c]],
                                        mean_distance=float(members.mean()) if len(members) else None))
    return summaries


def top_terms(texts: Sequence[str], assignments: np.ndarray, k: int, terms: int = 10) -> list[list[str]]:
    """The `terms` highest c-TF-IDF terms of each of the `k` clusters (see module docstring); [] for an empty one."""
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True, stop_words=list(stop_words()),
                                 dtype=np.float64)
    try:
        counts = vectorizer.fit_transform(texts)  # [N, V] sparse
    except ValueError:  # no token of 3+ characters anywhere
        return [[] for _ in range(k)]
    n = len(texts)
    membership = sparse.csr_matrix((np.ones(n), (np.asarray(assignments), np.arange(n))), shape=(k, n))  # [K, N]
    per_cluster = (membership @ counts).tocsr()  # [K, V] term counts of each cluster's class document
    words = np.asarray(per_cluster.sum(axis=1)).ravel()  # [K]
    term_totals = np.asarray(per_cluster.sum(axis=0)).ravel()  # [V]
    idf = np.log1p(words.mean() / term_totals)  # [V]
    tf = sparse.diags(1.0 / np.maximum(words, 1)) @ per_cluster  # [K, V], rows sum to 1
    scores = (tf @ sparse.diags(idf)).tocsr()
    vocabulary = vectorizer.get_feature_names_out()
    result = []
    for c in range(k):
        row = scores.getrow(c)
        order = np.lexsort((row.indices, -row.data))[:terms]  # highest score first, ties alphabetical
        result.append([str(vocabulary[row.indices[j]]) for j in order])
    return result


def write_summary(directory: str | Path, texts: Sequence[str], doc_ids: Sequence[str], clusters: Clusters, *,
                  terms: int = 10, examples: int = 3) -> list[ClusterSummary]:
    """Summarise `clusters` and write summary.json and summary.md into `directory`; returns the summaries."""
    directory = ensure_writable_dir(directory)
    summaries = summarize_clusters(texts, doc_ids, clusters, terms=terms, examples=examples)
    write_json(directory / SUMMARY_JSON, [asdict(s) for s in summaries])
    atomic_write_text(directory / SUMMARY_MD, _markdown(summaries, clusters))
    return summaries


def _nearest_documents(clusters: Clusters, examples: int) -> list[list[int]]:
    """Per cluster, the indices of its `examples` documents nearest the centroid, nearest first."""
    order = np.lexsort((clusters.distances, clusters.assignments))  # grouped by cluster, then by distance
    starts = np.searchsorted(clusters.assignments[order], np.arange(clusters.k + 1))  # [K + 1] group bounds
    return [order[starts[c]:min(starts[c] + examples, starts[c + 1])].tolist() for c in range(clusters.k)]


def _markdown(summaries: list[ClusterSummary], clusters: Clusters) -> str:
    embedder = f", embedder={clusters.embedder}" if clusters.embedder else ""
    lines = [f"# Clusters: k={clusters.k}, metric={clusters.metric}, balanced={clusters.balanced}{embedder}, "
             f"documents={len(clusters.assignments)}", "",
             "| cluster | size | mean d² | top terms | nearest documents |", "| ---: | ---: | ---: | --- | --- |"]
    for s in summaries:
        distance = "" if s.mean_distance is None else f"{s.mean_distance:.3f}"
        lines.append(f"| {s.cluster} | {s.size} | {distance} | {_cell(', '.join(s.top_terms))} | "
                     f"{_cell(', '.join(f'`{e}`' for e in s.examples))} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
