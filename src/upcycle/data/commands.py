"""CLI command that builds a text corpus from a named source."""

from __future__ import annotations

from upcycle.errors import UserError

SOURCES = ("system-docs",)


def make_corpus(out: str = "data/system-docs", source: str = "system-docs", docs_per_domain: int = 300,
                max_chars: int = 6000, min_chars: int = 800, seed: int = 0) -> None:
    """Build a multi-domain text corpus, one document per file in `OUT/<domain>/`, for `--data OUT`.

    `system-docs` renders the documentation installed on a Debian machine (man pages by section, perl docs, GNU
    info manuals, package READMEs) into plain English text that the real bases have not memorised. The folder is
    replaced atomically; `OUT/.corpus.json` lists every file with its source and SHA-256.

    Args:
        out: Output directory (replaced if it exists).
        source: Where the text comes from; only `system-docs` for now.
        docs_per_domain: Documents to take from each domain (fewer when a domain has fewer usable sources).
        max_chars: Longer documents are cut at the last paragraph boundary before this many characters.
        min_chars: Documents shorter than this (after cutting) are skipped.
        seed: Seed of the sample drawn from each domain's sorted sources.
    """
    if source not in SOURCES:
        raise UserError(f"--source {source}: unknown corpus source (choose from: {', '.join(SOURCES)})")
    from upcycle.data.system_docs import build_system_docs_corpus

    summary = build_system_docs_corpus(out, docs_per_domain=docs_per_domain, max_chars=max_chars,
                                       min_chars=min_chars, seed=seed)
    for name, domain in summary["domains"].items():
        print(f"{out}/{name}: {domain['documents']} documents, {domain['chars']:,} characters "
              f"(from {domain['candidates']} sources)")
    print(f"{out}: {summary['documents']} documents in {len(summary['domains'])} domains, "
          f"{summary['chars']:,} characters")
