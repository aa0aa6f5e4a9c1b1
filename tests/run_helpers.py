"""Shared by the pipeline, run-state and reliability tests: a small corpus, tiny expert settings, CLI assertions."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from upcycle.cli import main
from upcycle.data.corpus import stdlib_root

TOPICS = {"json": ["decoder.py", "encoder.py", "scanner.py"], "email": ["message.py", "utils.py", "header.py"],
          "asyncio": ["queues.py", "locks.py", "events.py"]}
TINY_EXPERT = ["--expert.tokens_per_expert", "512", "--expert.batch_size", "2", "--expert.block_size", "64"]


def make_corpus(root: Path) -> Path:
    """~60 documents: chunks of stdlib modules from three packages."""
    root.mkdir(parents=True, exist_ok=True)
    for package, files in TOPICS.items():
        for name in files:
            lines = (stdlib_root() / package / name).read_text().splitlines()
            for i in range(0, min(len(lines), 560), 80):
                (root / f"{package}_{name[:-3]}_{i}.py").write_text("\n".join(lines[i:i + 80]))
    return root


def cluster_args(corpus: Path, base: Path, out: Path, clusters: int = 2) -> list[str]:
    """`upcycle introvert cluster` on the small corpus with the fast tf-idf embedder."""
    return ["introvert", "cluster", "--data", str(corpus), "--base", str(base), "--clustering.clusters", str(clusters),
            "--clustering.embedder", "tfidf", "--out", str(out)]


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `upcycle ARGV` run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, needle: str = "", expected_code: int = 2) -> None:
    """The CLI's contract for bad input: a non-zero exit, one line on stderr that says what to fix, no traceback."""
    assert code == expected_code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("upcycle: error: ") and needle in err, err


def assert_run_loads(run: Path, experts: int | None = None) -> None:
    """The run opens, its router routes, and every listed expert is a complete adapter (without loading the base)."""
    from upcycle.introvert.model import check_adapter
    from upcycle.introvert.router import load_sequence_router
    from upcycle.introvert.run import Run

    opened = Run.open(run)
    assert opened.meta["clusters"]["k"] >= 1
    assert len(load_sequence_router(opened).route(["import json\njson.dumps({})"])) == 1
    for expert in opened.expert_ids():
        check_adapter(opened, expert)
    if experts is not None:
        assert len(opened.expert_ids()) == experts


def tree(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `path`: to show that a failed command changed nothing."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def make_read_only(monkeypatch, path: Path) -> None:
    """Make `path` unwritable: chmod for ordinary users; root ignores permissions, so there the write probe fails."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)
    else:
        monkeypatch.setattr("upcycle.io._probe", _probe_unless(path))


def _probe_unless(read_only: Path):
    from upcycle import io

    real = io._probe

    def probe(directory: Path) -> None:
        if Path(directory).resolve().is_relative_to(read_only.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(directory))
        real(directory)

    return probe


def restore_writable(path: Path) -> None:
    """Undo `make_read_only`'s chmod so that pytest can clean up."""
    for p in [path, *path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)
