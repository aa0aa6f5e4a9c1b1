"""A mask model as the serving stack sees it: `upcycle serve DIR --source masks` serves what `upcycle masks export`
wrote, as model "base", through the engine's usual forward (the compact layers' own decode path)."""

from __future__ import annotations

from pathlib import Path

from upcycle.errors import UserError
from upcycle.serving.source import ServedModel

LOADER = "upcycle.masks.method.export:load_compact"
"""The one entry point that loads an exported mask model (`load_compact`), named for the engine."""


def served_compact(path: str | Path, router: bool = True, routing=None) -> ServedModel:
    """The compacted model at `path` with no adapters (`router` and `routing` do not apply: masks route per token
    inside the model)."""
    from upcycle.io import read_json
    from upcycle.masks.method.export import SECTION

    path = Path(path)
    config = path / "config.json"
    if not config.is_file() or SECTION not in read_json(config):
        raise UserError(f"{path} is not an exported mask model (no config.json with an '{SECTION}' section); write "
                        "one with `upcycle masks export RUN`")
    return ServedModel(base=str(path), loader=LOADER, root=path)
