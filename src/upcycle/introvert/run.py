"""The run directory: the documented contract between the MoIN pipeline's steps and its users.

```
RUN/
  run.json                 config, versions, seeds, content hashes (written by `upcycle introvert cluster`, updated
                           later)
  clusters/                centroids.npy, clusters.json, assignments.json, summary.{json,md}, embedder/
  experts/<expert id>/     one PEFT LoRA directory per cluster: adapter_config.json + adapter_model.safetensors
                           + expert.json (cluster, tokens, losses); the directory appears only when complete
  baselines/<name>/        the comparison models trained by `upcycle introvert train-baselines` (PEFT dirs or full
                           checkpoints)
  eval/results.json        every number in the report (schema in docs/run-directory.md)
  report.md, *.png         the readable report
  add-data.pending/        the plan of an `add-data` not yet committed (plan.json, the new clusters/)
  .upcycle-lock             held (flock) by the process that writes the run: cluster, train-experts,
                           train-baselines, evaluate, add-data
```
Expert ids are `expert-<cluster index, 5 digits>`, so a directory listing sorts by cluster.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from upcycle.errors import UserError
from upcycle.io import (
    Locked,
    ensure_writable_dir,
    exclusive_lock,
    is_temporary,
    read_json,
    remove_stale_temporaries,
    write_json,
)

RUN_FORMAT = 1
LOCK_FILE = ".upcycle-lock"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PEFT needs to load an expert
_EXPERT_ID = re.compile(r"^expert-(\d{5})$")
# Artefacts written through upcycle.io's atomic helpers, per folder of the run (regexes of their names): a killed
# process can leave their temporaries behind, and only these are ever removed.
_ATOMIC_NAMES = {".": r"run\.json|clusters|add-data\.pending|report\.md|[\w-]+\.png", "experts": r"expert-\d{5}",
                 "baselines": r"lora-all|lora-wide|full", "eval": r"[\w-]+\.json"}


SPLIT_EMBEDDINGS = "embeddings"
"""clusters/embeddings/{train,validation,test}.npy: every split's document embeddings, saved by the cluster step (so
other K can be fitted, and the guard calibrated, without embedding again)."""


def expert_id(cluster: int) -> str:
    """The expert id serving cluster `cluster`."""
    return f"expert-{cluster:05d}"


def cluster_of(expert: str) -> int:
    """The cluster index of an expert id (inverse of `expert_id`)."""
    match = _EXPERT_ID.match(expert)
    if not match:
        raise UserError(f"'{expert}' is not an expert id (expected expert-00000 style)")
    return int(match.group(1))


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a run depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("upcycle", "torch", "transformers", "peft", "sentence-transformers", "faiss-cpu"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class Run:
    """A run directory on disk. run.json is read once, on first use of `meta`; writes go through `write_meta` /
    `update_meta`, which keep it current. Open it once per command and pass the object on."""

    path: Path
    _meta: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open an existing run directory, or raise a UserError saying which step makes one."""
        path = Path(path)
        if not (path / "run.json").is_file():
            raise UserError(f"{path} is not a run directory (no run.json); create one with "
                            f"`upcycle introvert cluster --out {path}`")
        return cls(path)

    @classmethod
    def of(cls, run: Run | str | Path) -> Run:
        """`run` itself when it is already open, else `Run.open(run)` (for entry points that also take a path)."""
        return run if isinstance(run, Run) else cls.open(run)

    @staticmethod
    def check_new_location(path: Path) -> None:
        """Refuse to start a run in `path` when it holds files and is not a run: the files are someone else's, and a
        run replaces folders such as clusters/. What an interrupted step of ours left there does not count."""
        if not path.exists():
            return
        if not path.is_dir():
            raise UserError(f"--out {path} is a file, not a directory; choose another --out")
        if (path / "run.json").is_file():
            return
        ours = lambda name: name == LOCK_FILE or is_temporary(name, _ATOMIC_NAMES["."])  # noqa: E731
        foreign = sorted(p.name for p in path.iterdir() if not ours(p.name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(f"--out {path} is not empty and not a run directory (it holds {shown}); choose a new or "
                            "empty directory")

    # -- run.json -------------------------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """run.json, read on first use and kept up to date by this object's writes."""
        if self._meta is None:
            self._meta = read_json(self.path / "run.json")
        return self._meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace run.json with `meta` (atomically)."""
        write_json(self.path / "run.json", meta)
        self._meta = dict(meta)

    def update_meta(self, **fields: Any) -> None:
        """Merge `fields` into run.json (atomically)."""
        meta = dict(self.meta) if (self.path / "run.json").exists() else {}
        self.write_meta(meta | fields)

    def record_command(self, command: str) -> None:
        """Append a command line to run.json's `commands`, so the report can say how to reproduce the run."""
        self.update_meta(commands=self.meta.get("commands", []) + [command])

    @staticmethod
    def new_meta(**fields: Any) -> dict[str, Any]:
        """The run.json of a fresh run (format version, creation time, library versions, plus `fields`)."""
        return {"format": RUN_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": library_versions(), **fields}

    @staticmethod
    def create(path: str | Path, **fields: Any) -> Run:
        """Write a fresh run.json (see `new_meta`)."""
        run = Run(Path(path))
        run.write_meta(Run.new_meta(**fields))
        return run

    # -- one writer at a time -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the run's lock for the block, or raise a UserError naming the process that holds it.

        Two writers would both train every expert and the last rename would win; the lock makes the second one
        stop at once. A lock whose holder died (even by kill -9) is free again: see `upcycle.io.exclusive_lock`.
        """
        ensure_writable_dir(self.path, hint="make the run directory writable, or copy it somewhere writable")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            with exclusive_lock(self.path / LOCK_FILE, holder):
                yield
        except Locked as locked:
            raise UserError(f"{self.path} is in use by {_describe_holder(locked.holder)}; wait for it to finish "
                            "or stop it, then rerun") from None

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove temporaries of atomic writes left by a killed process (call it while holding the lock)."""
        return [path for folder, names in _ATOMIC_NAMES.items()
                for path in remove_stale_temporaries(self.path / folder, names)]

    @property
    def base(self) -> str:
        """The base model's directory or hub id."""
        return self.meta["base"]

    # -- layout ---------------------------------------------------------------------------------------------------
    @property
    def clusters_dir(self) -> Path:
        return self.path / "clusters"

    @property
    def experts_dir(self) -> Path:
        return self.path / "experts"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def expert_dir(self, expert: str) -> Path:
        return self.experts_dir / expert

    def expert_ids(self) -> list[str]:
        """Ids of the experts that finished training (complete PEFT directories), sorted."""
        if not self.experts_dir.is_dir():
            return []
        return sorted(p.name for p in self.experts_dir.iterdir()
                      if _EXPERT_ID.match(p.name) and self._has(p.name, ADAPTER_FILES))

    def is_trained(self, expert: str) -> bool:
        """Whether train-experts finished this expert: a loadable adapter plus its train.json. Anything less (a
        directory damaged after the fact) is trained again."""
        return self._has(expert, (*ADAPTER_FILES, "train.json"))

    def _has(self, expert: str, names: tuple[str, ...]) -> bool:
        return all((self.expert_dir(expert) / name).is_file() for name in names)


def _describe_holder(holder: dict[str, Any]) -> str:
    """'process 123 on host (upcycle introvert train-experts runs/x, since ...)' from a lock record, as far as it is
    known."""
    if not holder.get("pid"):
        return "another process"
    return (f"process {holder['pid']} on {holder.get('host', '?')} ({holder.get('command') or 'upcycle'}, since "
            f"{holder.get('since', '?')})")
