"""The run directory: the documented contract between the MoIN pipeline's steps and its users.

```
RUN/
  run.json                 config, versions, seeds, content hashes (written by `upcycle cluster`, updated later)
  clusters/                centroids.npy, clusters.json, assignments.json, summary.{json,md}, embedder/
  experts/<expert id>/     one PEFT LoRA directory per cluster: adapter_config.json + adapter_model.safetensors
                           + expert.json (cluster, tokens, losses); the directory appears only when complete
  baselines/<name>/        the comparison models trained by `upcycle evaluate` (PEFT dirs or full checkpoints)
  eval/results.json        every number in the report (schema in docs/run-directory.md)
  report.md, *.png         the readable report
```
Expert ids are `expert-<cluster index, 5 digits>`, so a directory listing sorts by cluster.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from upcycle.errors import UserError
from upcycle.io import read_json, write_json

RUN_FORMAT = 1
_EXPERT_ID = re.compile(r"^expert-(\d{5})$")


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
    """A run directory on disk. Cheap to construct; every accessor reads the files it needs."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open an existing run directory, or raise a UserError saying which step makes one."""
        path = Path(path)
        if not (path / "run.json").is_file():
            raise UserError(f"{path} is not a run directory (no run.json); create one with `upcycle cluster --out "
                            f"{path}`")
        return cls(path)

    # -- run.json -------------------------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return read_json(self.path / "run.json")

    def update_meta(self, **fields: Any) -> None:
        """Merge `fields` into run.json (atomically)."""
        meta = self.meta if (self.path / "run.json").exists() else {}
        meta.update(fields)
        write_json(self.path / "run.json", meta)

    def record_command(self, command: str) -> None:
        """Append a command line to run.json's `commands`, so the report can say how to reproduce the run."""
        self.update_meta(commands=self.meta.get("commands", []) + [command])

    @staticmethod
    def create(path: str | Path, **fields: Any) -> Run:
        """Write a fresh run.json (format version, creation time, library versions, plus `fields`)."""
        run = Run(Path(path))
        write_json(run.path / "run.json", {"format": RUN_FORMAT,
                                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                           "versions": library_versions(), **fields})
        return run

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
                      if _EXPERT_ID.match(p.name) and (p / "adapter_model.safetensors").is_file())
