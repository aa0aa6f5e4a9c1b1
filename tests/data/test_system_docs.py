"""The system-docs corpus builder on a small fake documentation tree (man pages, an info manual, a README)."""

import gzip
import json
import re
import shutil

import pytest

from upcycle.data import load_documents
from upcycle.data.system_docs import MANIFEST, build_system_docs_corpus, clean_text, truncate
from upcycle.errors import UserError
from upcycle.io import sha256_file

pytestmark = pytest.mark.skipif(shutil.which("man") is None and shutil.which("groff") is None,
                                reason="needs man-db or groff to render man pages")

PARAGRAPH = ("The {name} {kind} reads the \\fBinput\\fR and writes the \\fIresult\\fR to standard output; "
             "it is described here at some length so that the page is long enough to keep.")


def _man_page(name: str, section: str, paragraphs: int) -> bytes:
    body = "\n.PP\n".join(PARAGRAPH.format(name=name, kind=f"tool {i}") for i in range(paragraphs))
    return (f'.TH {name.upper()} {section} "2024-01-01" "fake 1.0" "Fake Manual"\n.SH NAME\n{name} \\- a fake page\n'
            f".SH SYNOPSIS\n.B {name}\n[\\fIOPTION\\fR]...\n.SH DESCRIPTION\n{body}\n").encode()


def _fake_tree(root, man_sections=("1", "3")):
    man = root / "man"
    for section in man_sections:
        (man / f"man{section}").mkdir(parents=True)
        for i, name in enumerate(["alpha", "beta", "gamma", "delta", "tiny"]):
            page = _man_page(f"{name}{section}", section, paragraphs=1 if name == "tiny" else 6 + 4 * i)
            (man / f"man{section}" / f"{name}{section}.{section}.gz").write_bytes(gzip.compress(page))
        (man / f"man{section}" / f"alias{section}.{section}.gz").write_bytes(gzip.compress(
            f".so man{section}/alpha{section}.{section}\n".encode()))
    (man / "fr" / "man1").mkdir(parents=True)  # a translation: never read
    (man / "fr" / "man1" / "alpha1.1.gz").write_bytes(gzip.compress(_man_page("alphafr", "1", 8)))

    info = root / "info"
    info.mkdir()
    nodes = [f"\x1f\nFile: fake.info,  Node: Chapter {i},  Next: Chapter {i + 1},  Up: Top\n\n{i} Chapter\n"
             f"*********\n\n" + f"Info text\x00\x08[index\x00\x08] about\tchapter {i}. " * 30 * (i + 1)
             + "\n\n* Menu:\n\n* Sub:: a sub node.\n" for i in range(3)]
    nodes.append("\x1f\nFile: fake.info,  Node: Concept Index\n\n" + "* entry: Chapter 1. (line 3)\n" * 80)
    (info / "fake.info.gz").write_bytes(gzip.compress(("This is fake.info.\n" + "".join(nodes)).encode()))

    doc = root / "doc"
    (doc / "pkg").mkdir(parents=True)
    (doc / "pkg" / "README").write_text("A package README.\r\n\r\n" + "It explains\x1b[1m things\x1b[0m. " * 60)
    (doc / "pkg" / "copyright").write_text("Copyright text. " * 100)
    (doc / "pkg" / "NEWS.md.gz").write_bytes(gzip.compress(("## 1.0\n\n" + "News of the release. " * 40).encode()))
    (doc / "jp").mkdir()
    (doc / "jp" / "README").write_text("\u65e5\u672c\u8a9e\u306e\u8aac\u660e\u3002" * 200)  # not English
    return {"man_root": man, "info_root": info, "doc_root": doc}


def test_corpus_per_domain_clean_bounded_and_loadable(tmp_path):
    roots = _fake_tree(tmp_path / "tree")
    out = tmp_path / "corpus"
    summary = build_system_docs_corpus(out, docs_per_domain=3, max_chars=1500, min_chars=400, **roots)

    assert set(summary["domains"]) == {"commands", "c-library", "gnu-info", "debian-docs"}
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt"))
    assert written == [f["path"] for f in summary["files"]]
    assert {p.split("/")[0] for p in written} == set(summary["domains"])
    assert summary["domains"]["commands"]["documents"] == 3  # 4 long enough pages; tiny and the .so alias never
    assert not any("tiny" in p or "alias" in p or "Index" in p or "copyright" in p for p in written)
    assert [p for p in written if p.startswith("debian-docs/")] == ["debian-docs/pkg.NEWS.md.txt",
                                                                   "debian-docs/pkg.README.txt"]
    for path in written:
        text = (out / path).read_text(encoding="utf-8")
        assert 400 <= len(text) <= 1500, path
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text), path
        assert "alphafr" not in text and "* Menu:" not in text and "File: fake.info" not in text
    assert "The alpha1 tool 0 reads the input and writes the result" in (out / "commands/alpha1.1.txt").read_text()

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == json.loads(json.dumps(summary)) and manifest["settings"]["max_chars"] == 1500
    assert all(f["sha256"] == sha256_file(out / f["path"]) for f in manifest["files"])
    docs = load_documents(str(out))
    assert sorted(d.id for d in docs) == written


def test_two_builds_are_identical(tmp_path):
    roots = _fake_tree(tmp_path / "tree")
    first, second = tmp_path / "a", tmp_path / "b"
    build_system_docs_corpus(first, docs_per_domain=2, max_chars=1500, min_chars=400, seed=3, **roots)
    build_system_docs_corpus(second, docs_per_domain=2, max_chars=1500, min_chars=400, seed=3, **roots)
    assert sha256_file(first / MANIFEST) == sha256_file(second / MANIFEST)


def test_fewer_than_two_domains_is_a_user_error(tmp_path):
    roots = _fake_tree(tmp_path / "tree", man_sections=("1",))
    shutil.rmtree(roots["info_root"])
    shutil.rmtree(roots["doc_root"])
    with pytest.raises(UserError, match="apt-get install .*manpages-dev"):
        build_system_docs_corpus(tmp_path / "corpus", docs_per_domain=2, max_chars=1500, min_chars=400, **roots)
    assert not (tmp_path / "corpus").exists()


def test_clean_text_and_truncate():
    raw = "B\x08Bo\x08ol\x08ld _\x08u\r\n\x1b[1mx\x1b[0m\ty\u2010z\n\n\n\n\u250c\u2500\u2510\u2502end"
    assert clean_text(raw) == "Bold u\nx       y-z\n\n+-+|end\n"
    text = "one two\n\nthree four\n\nfive six\n"
    assert truncate(text, 100) == text
    assert truncate(text, 21) == "one two\n\nthree four\n"
    assert truncate("a" * 50 + "\n" + "b" * 50, 60) == "a" * 50 + "\n"
    assert truncate("word " * 30, 60) == "word " * 10 + "word\n"  # one long line: cut between words
