"""Atomic file and directory writes, content hashes and JSON helpers.

Readers never see a half-written artefact: every write goes to a temporary sibling and is renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from upcycle.errors import UserError

log = logging.getLogger(__name__)


WRITE_PROBE_PREFIX = ".write-probe-"


def ensure_writable_dir(path: str | Path, hint: str = "choose another output directory") -> Path:
    """Create `path` if needed and check that we can write there, or raise a UserError saying so."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe(path)
    except OSError as error:
        raise UserError(f"cannot write to {path}: {error.strerror}; {hint}") from None
    return path


def check_writable(path: str | Path, hint: str = "choose another output directory") -> None:
    """Raise a UserError unless `path`, or the directory it would be created in, accepts new files.

    Nothing is created, so a command can check its output before hours of work and still leave no trace when a
    later check (bad data, say) stops it.
    """
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(existing))
        _probe(existing)
    except OSError as error:
        where = "" if existing == path else f" ({existing} is where it would be created)"
        raise UserError(f"cannot write to {path}: {error.strerror}{where}; {hint}") from None


def _probe(directory: Path) -> None:
    """Create and remove a file in `directory`: the one test that also catches read-only mounts and quotas."""
    tempfile.NamedTemporaryFile(dir=directory, prefix=WRITE_PROBE_PREFIX, delete=True).close()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON, turning a missing or corrupt file into a UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); delete it and rerun the step that writes it") from None


@contextlib.contextmanager
def atomic_directory(final: str | Path, commit: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to `final` only if the block finishes.

    An existing `final` is replaced. On any exception the temporary directory is removed, so a reader sees either
    the old complete directory or the new complete one. `commit`, when given, runs right after the rename (it
    writes the file that describes the directory, such as run.json); if it fails, the old directory is put back,
    so the directory and its description change together or not at all.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    trash = final.with_name(f".{final.name}.old-{os.getpid()}")
    had_old = False
    try:
        yield tmp
        if final.exists():
            os.replace(final, trash)
            had_old = True
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if had_old and not final.exists():
            os.replace(trash, final)
        raise
    try:
        if commit is not None:
            commit()
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # the new directory, written by this block
        if had_old:
            os.replace(trash, final)
        raise
    if had_old:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(directory: str | Path, names: str) -> list[Path]:
    """Remove the leftovers of atomic writes that a killed process could not clean up; returns what was removed.

    Only names these helpers make are touched: `.<name>.<random>.tmp` (a file or directory being written) and
    `.<name>.old-<pid>` (a replaced directory on its way out), where `<name>` matches the regex `names`. Call it
    only while holding the lock of what `directory` belongs to, so that no live writer owns them.
    """
    directory = Path(directory)
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if is_temporary(path.name, names):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def is_temporary(name: str, names: str) -> bool:
    """Whether `name` is a temporary of these helpers for an artefact whose name matches the regex `names`."""
    return re.match(rf"^\.(?:{names})\.(?:[^/]+\.tmp|old-\d+)$", name) is not None or name.startswith(
        WRITE_PROBE_PREFIX)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, holder: dict[str, Any]) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the block, with `holder` (who, since when) written in it.

    Raises `Locked` with the current holder's record when another process holds it. The lock is flock(2), which the
    kernel releases when its holder exits, however it exits: a lock left by a killed process is simply taken over,
    with no guessing from pids. The file stays (removing it would let two processes lock two different files).
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        record = _read_lock_record(fd)
        os.close(fd)
        raise Locked(record) from None
    except OSError as error:  # a filesystem without locks (some network mounts): say so and go on unlocked
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
            os.close(fd)
            raise
        log.warning("cannot lock %s (%s); make sure no other process writes there", path, error.strerror)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
        os.close(fd)


class Locked(Exception):
    """Another process holds a lock; `holder` is what it wrote in the lock file (empty when unreadable)."""

    def __init__(self, holder: dict[str, Any]):
        super().__init__(holder)
        self.holder = holder


def _read_lock_record(fd: int) -> dict[str, Any]:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
