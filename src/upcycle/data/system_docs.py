"""A multi-domain English corpus built offline from the documentation installed on a Debian machine.

Each domain is a different kind of text, and none of it is Python source, which the real bases (SmolLM2) have
memorised:

- `commands`: section-1 man pages (user commands), at most a few per family so that e.g. `gcloud_*` or `git-*`
  pages cannot fill the domain;
- `c-library`: section-2 and section-3 man pages of C interfaces (not the perl `3pm` / `3perl` pages);
- `perl`: perl's module and language documentation (`3pm` / `3perl` man pages and the `perl*` pages of section 1);
- `gnu-info`: GNU info manuals (`/usr/share/info/*.info*.gz`) split into nodes, index and licence nodes left out;
- `system`: sections 4, 5, 7 and 8 (devices, file formats, overviews, administration);
- `debian-docs`: README, NEWS, FAQ and other text (`.md`, `.rst`, `.txt`) documentation of Debian packages under
  `/usr/share/doc` (no copyright, licence or changelog files).

English only: the `/usr/share/man/<lang>/` trees are never read, and documents that are more than 2 % non-Latin
letters (perl's Japanese and Chinese guides) are skipped. Man pages are rendered with `man -l` (groff under
it) without hyphenation or justification, and every document is cleaned of overstrike backspaces, escape sequences
and other control characters. Candidates are sorted, shuffled with a seed and taken in that order until a domain
has `docs_per_domain` documents of at least `min_chars` characters (cut at `max_chars` on a paragraph boundary),
so the same machine and settings give the same files byte for byte.

The corpus in `data/system-docs` was built on Debian 12 with these documentation packages installed; rebuild it
with::

    apt-get install -y --no-install-recommends man-db groff-base manpages manpages-dev perl-doc bash-doc
    upcycle make-corpus --out data/system-docs
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from upcycle.data.corpus import decode_text
from upcycle.errors import UserError

log = logging.getLogger(__name__)

SOURCE = "system-docs"
MANIFEST = ".corpus.json"  # dot-prefixed so that `load_documents(out)` does not read it as a document
INSTALL_HINT = "apt-get install man-db groff-base manpages manpages-dev perl-doc bash-doc"

_MAN_SECTION = re.compile(r"^man(\d)$")
_PAGE = re.compile(r"^(?P<name>.+)\.(?P<section>\d[a-z]*)(?:\.gz)?$")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")
# Typographic characters groff emits in UTF-8 mode, written the way the sources mean them.
_PLAIN = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2212": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"',
                        "\u201d": '"', "\u00a0": " ", "\u00ad": None, "\u2002": " ", "\u2003": " ", "\u2009": " ",
                        # tbl's box drawing (U+2500..U+257F) as the ASCII boxes of `groff -Tascii`
                        **{chr(c): "-" if c in (0x2500, 0x2501, 0x2550) else "|" if c in (0x2502, 0x2503, 0x2551)
                           else "+" for c in range(0x2500, 0x2580)}})
_INFO_SKIP_NODE = re.compile(r"(?i)index|licen[cs]e|copying")
_DOC_NAME = re.compile(r"(?i)^(readme|news|faq|todo)([._-].*)?$|\.(md|rst|txt)$")
_DOC_SKIP = re.compile(r"(?i)changelog|copyright|copying|licen[cs]e|authors|\.(html?|pdf|png|jpe?g|svg|ps|dvi)(\.gz)?$")
_LANG_SUFFIX = re.compile(r"(?i)[._-](cs|da|de|es|fi|fr|hu|it|ja|ko|nl|pl|pt|pt_br|ru|sv|tr|uk|zh|zh_cn|zh_tw)$")


@dataclass(frozen=True)
class Source:
    """One candidate document: where it comes from and how to read it as plain text (None when unusable)."""

    name: str  # file name in the domain folder, without `.txt`
    family: str  # pages of one family (`git-*`, one info manual, one package) are capped per domain
    origin: str  # the file (and info node) it was read from
    read: Callable[[], str | None]


@dataclass(frozen=True)
class Roots:
    """Where the documentation lives; tests point these at a fake tree."""

    man: Path
    info: Path
    doc: Path


@dataclass(frozen=True)
class Domain:
    """A kind of text: which sources belong to it and how many may come from one family."""

    name: str
    about: str
    list_sources: Callable[[Roots], list[Source]]
    per_family: int


def build_system_docs_corpus(out: Path, docs_per_domain: int = 300, max_chars: int = 6000, min_chars: int = 800,
                             seed: int = 0, man_root: str | Path = "/usr/share/man",
                             info_root: str | Path = "/usr/share/info",
                             doc_root: str | Path = "/usr/share/doc") -> dict:
    """Write `out/<domain>/<name>.txt` and `out/.corpus.json` from installed documentation; return the manifest."""
    from upcycle.io import atomic_directory, sha256_file, write_json

    if docs_per_domain < 1 or min_chars < 1 or max_chars < min_chars:
        raise UserError(f"need docs_per_domain >= 1 and 1 <= min_chars <= max_chars (got {docs_per_domain}, "
                        f"{min_chars}, {max_chars})")
    roots = Roots(Path(man_root), Path(info_root), Path(doc_root))
    found = {}
    for domain in DOMAINS:
        sources = domain.list_sources(roots)
        if sources:
            found[domain.name] = (domain, sources)
        else:
            log.warning("domain %s skipped: no sources installed (%s)", domain.name, domain.about)
    if len(found) < 2:
        raise UserError(f"only {len(found)} documentation domain(s) found under {roots.man}, {roots.info} and "
                        f"{roots.doc}; install the documentation first: {INSTALL_HINT}")

    out = Path(out)
    summary: dict = {"source": SOURCE, "domains": {}, "documents": 0, "chars": 0, "files": [],
                     "settings": {"docs_per_domain": docs_per_domain, "max_chars": max_chars, "min_chars": min_chars,
                                  "seed": seed, "man_root": str(roots.man), "info_root": str(roots.info),
                                  "doc_root": str(roots.doc)}}
    seen: set[str] = set()  # texts already taken: copies of one README or page under two names appear once
    with atomic_directory(out) as tmp, _progress() as progress:
        for name, (domain, sources) in found.items():
            task = progress.add_task(name, total=docs_per_domain) if progress else None
            advance = partial(progress.advance, task) if progress else (lambda: None)
            picked = _pick(domain, sources, docs_per_domain, min_chars, max_chars, seed, seen, advance)
            if progress:
                progress.update(task, total=len(picked))  # a domain short of documents ends as done too
            if not picked:
                log.warning("domain %s skipped: none of its %d sources is %d characters or longer", name,
                            len(sources), min_chars)
                continue
            (tmp / name).mkdir()
            for source, text in picked:
                rel = f"{name}/{source.name}.txt"
                (tmp / rel).write_text(text, encoding="utf-8")
                summary["files"].append({"path": rel, "source": source.origin, "chars": len(text)})
            chars = sum(len(text) for _, text in picked)
            summary["domains"][name] = {"about": domain.about, "documents": len(picked), "chars": chars,
                                        "candidates": len(sources)}
            if len(picked) < docs_per_domain:
                log.warning("domain %s: only %d of %d documents from its %d sources", name, len(picked),
                            docs_per_domain, len(sources))
        if len(summary["domains"]) < 2:
            raise UserError(f"fewer than 2 domains have documents of {min_chars}+ characters; install more "
                            f"documentation: {INSTALL_HINT}")
        summary["files"].sort(key=lambda f: f["path"])
        for entry in summary["files"]:
            entry["sha256"] = sha256_file(tmp / entry["path"])
        summary["documents"] = len(summary["files"])
        summary["chars"] = sum(d["chars"] for d in summary["domains"].values())
        write_json(tmp / MANIFEST, summary)
    return summary


def _pick(domain: Domain, sources: list[Source], want: int, min_chars: int, max_chars: int, seed: int,
          seen: set[str], advance: Callable[[], None]) -> list[tuple[Source, str]]:
    """Read sources in a seeded order until `want` are usable; reads run in threads, acceptance stays in order."""
    order = sorted(sources, key=lambda s: (s.name, s.origin))
    random.Random(f"{seed}:{domain.name}").shuffle(order)
    picked: list[tuple[Source, str]] = []
    names: set[str] = set()
    families: Counter[str] = Counter()
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        start = 0
        while start < len(order) and len(picked) < want:
            chunk = [s for s in order[start:start + 4 * workers] if families[s.family] < domain.per_family]
            start += 4 * workers
            for source, raw in zip(chunk, pool.map(lambda s: s.read(), chunk)):
                if len(picked) == want or families[source.family] >= domain.per_family or raw is None:
                    continue
                text = truncate(clean_text(raw), max_chars)
                if len(text) < min_chars or text in seen or source.name in names or not _is_english(text):
                    continue
                seen.add(text)
                names.add(source.name)
                families[source.family] += 1
                picked.append((source, text))
                advance()
    return picked


def clean_text(text: str) -> str:
    """Plain text: no overstrike, escape sequences or control characters; tabs expanded, blank runs collapsed."""
    text = _ANSI.sub("", text)
    while _OVERSTRIKE.search(text):
        text = _OVERSTRIKE.sub("", text)
    text = text.replace("\r\n", "\n").translate(_PLAIN).expandtabs(8)
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def truncate(text: str, max_chars: int) -> str:
    """Cut `text` to `max_chars` at the last paragraph break, or line, sentence or word break if that keeps more.

    A break is used only if it keeps at least half of `max_chars`; the last resort is a hard cut.
    """
    if len(text) <= max_chars:
        return text
    for separator in ("\n\n", "\n", ". ", " "):
        cut = text.rfind(separator, 0, max_chars - 1)
        if cut >= max_chars // 2:
            return text[:cut + len(separator)].rstrip() + "\n"
    return text[:max_chars - 1] + "\n"


# ---- man pages ----------------------------------------------------------------------------------------------------

def _man_pages(root: Path, sections: Iterable[str], keep: Callable[[str, str], bool]) -> list[Source]:
    """Regular (not symlinked, not `.so`-redirect) pages in `root/man<N>` for N in `sections`, kept by name/section."""
    sources = []
    for section_dir in sorted(root.glob("man*")):
        match = _MAN_SECTION.match(section_dir.name)
        if not match or match.group(1) not in sections or not section_dir.is_dir():
            continue
        for path in sorted(section_dir.iterdir()):
            page = _PAGE.match(path.name)
            if page is None or path.is_symlink() or not path.is_file() or not keep(page["name"], page["section"]):
                continue
            name = f"{page['name']}.{page['section']}"
            sources.append(Source(name=_safe(name), family=_family(page["name"]), origin=str(path),
                                  read=partial(_render_man, path)))
    return sources


def _render_man(path: Path) -> str | None:
    """A man page as plain text, header and footer lines dropped; None for `.so` redirects and pages that fail."""
    try:
        head = (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")).read(4096)
    except (OSError, EOFError):
        return None
    lines = head.strip().split(b"\n")
    if len(lines) <= 3 and any(line.startswith(b".so ") for line in lines):
        return None
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_DISABLE_SECCOMP": "1", "MANPAGER": "cat",
           "PAGER": "cat"}
    env.pop("MAN_KEEP_FORMATTING", None)
    if shutil.which("man"):
        command = ["man", "-l", "--nh", "--nj", "-P", "cat", str(path)]
        result = subprocess.run(command, capture_output=True, env=env, timeout=60)
    else:  # groff alone: no hyphenation (HY=0), overstrike rather than escape sequences (-c), removed by clean_text
        source = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        command = ["groff", "-t", "-man", "-Tutf8", "-rHY=0", "-rLL=80n", "-P-c"]
        result = subprocess.run(command, input=source, capture_output=True, env=env, timeout=60)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    lines = result.stdout.decode("utf-8", errors="replace").rstrip().split("\n")
    title = re.compile(r"\(\d[^)]*\)\s*$")
    if lines and title.search(lines[0]):
        lines = lines[1:]
    if lines and title.search(lines[-1]):
        lines = lines[:-1]
    return "\n".join(lines)


def _commands(roots: Roots) -> list[Source]:
    return _man_pages(roots.man, "1", lambda name, section: not name.startswith("perl"))


def _c_library(roots: Roots) -> list[Source]:
    return _man_pages(roots.man, "23", lambda name, section: section not in ("3pm", "3perl"))


def _perl(roots: Roots) -> list[Source]:
    return _man_pages(roots.man, "13", lambda name, section: section in ("3pm", "3perl")
                      or (section.startswith("1") and name.startswith("perl")))


def _system(roots: Roots) -> list[Source]:
    return _man_pages(roots.man, "4578", lambda name, section: True)


# ---- info manuals -------------------------------------------------------------------------------------------------

def _info_nodes(roots: Roots) -> list[Source]:
    """One source per node of every info manual: the node text with its header line and trailing menu removed."""
    sources = []
    files = sorted(p for p in roots.info.glob("*.info*") if p.is_file() and re.search(r"\.info(-\d+)?(\.gz)?$", p.name))
    for path in files:
        manual = path.name.split(".info")[0]
        try:
            raw = (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")).read()
        except (OSError, EOFError):
            log.warning("cannot read info file %s", path)
            continue
        for chunk in raw.decode("utf-8", errors="replace").split("\x1f"):
            chunk = chunk.lstrip("\n")
            header, _, body = chunk.partition("\n")
            node = re.search(r"Node: *([^,\t\n]+)", header) if header.startswith("File:") else None
            if node is None or _INFO_SKIP_NODE.search(node.group(1)):
                continue
            body = re.split(r"^\* Menu:", body, maxsplit=1, flags=re.M)[0]
            body = body.replace("\x00\x08[index\x00\x08]", "")
            name = _safe(f"{manual}.{node.group(1).strip()}")
            sources.append(Source(name=name, family=manual, origin=f"{path}#{node.group(1).strip()}",
                                  read=partial(str, body)))
    return sources


# ---- Debian package documentation ---------------------------------------------------------------------------------

def _debian_docs(roots: Roots) -> list[Source]:
    """README / NEWS / FAQ / TODO and .md / .rst / .txt files of each package (plain or gzipped); no copyright,
    licence, changelog, HTML or translations."""
    sources = []
    if not roots.doc.is_dir():
        return sources
    for package in sorted(p for p in roots.doc.iterdir() if p.is_dir() and not p.is_symlink()):
        for path in sorted(package.rglob("*")):
            stem = path.name.removesuffix(".gz")
            if (not _DOC_NAME.search(stem) or _DOC_SKIP.search(path.name) or _LANG_SUFFIX.search(stem)
                    or path.is_symlink() or not path.is_file()):
                continue
            rel = path.relative_to(package).as_posix().removesuffix(".gz")
            sources.append(Source(name=_safe(f"{package.name}.{rel}"), family=package.name, origin=str(path),
                                  read=partial(_read_doc, path)))
    return sources


def _read_doc(path: Path) -> str | None:
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
        return None
    return decode_text(raw)


# ---- helpers ------------------------------------------------------------------------------------------------------

def _is_english(text: str) -> bool:
    """False when more than 2 % of the characters are letters outside the Latin scripts (CJK, Cyrillic, ...)."""
    foreign = sum(1 for ch in text if ord(ch) > 0x24F and ch.isalpha())
    return foreign <= 0.02 * len(text)


def _family(page: str) -> str:
    return re.split(r"::|[-_.]", page, maxsplit=1)[0].lower() or page


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._")[:120] or "document"


def _progress():
    if os.environ.get("UPCYCLE_NO_PROGRESS"):
        from contextlib import nullcontext

        return nullcontext()
    from upcycle.progress import make_progress

    return make_progress()


DOMAINS = (
    Domain("commands", "section-1 man pages: user commands", _commands, per_family=3),
    Domain("c-library", "section-2/3 man pages: C system calls and library functions", _c_library, per_family=8),
    Domain("perl", "perl module and language documentation (3pm/3perl and perl* man pages)", _perl, per_family=10),
    Domain("gnu-info", "GNU info manuals split into nodes", _info_nodes, per_family=50),
    Domain("system", "section-4/5/7/8 man pages: devices, file formats, overviews, administration", _system,
           per_family=5),
    Domain("debian-docs", "README, NEWS and other text documentation of Debian packages", _debian_docs,
           per_family=3),
)
