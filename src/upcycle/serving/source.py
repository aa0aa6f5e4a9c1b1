"""What a method hands the server: a base model, a table of named LoRA adapters, and optionally a router.

Serving knows no method. A method makes its trained experts servable with one factory `f(path, router=True) ->
ServedModel`, which may also take `routing=RoutingConfig` (the `--routing.*` settings of model "auto"); `upcycle serve
RUN` calls `DEFAULT_SOURCE` (introvert runs), and the engine, the server, the Ray Serve deployment and the vLLM
command all start from the `ServedModel` it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.serving.config import RoutingConfig
from upcycle.serving.router import ExpertRouter, load_factory

DEFAULT_SOURCE = "upcycle.introvert.serving:served_run"
"""The factory `upcycle serve` reads a directory with (a plugin reference, like `--router`: not an import)."""
SOURCES = {"introvert": DEFAULT_SOURCE, "masks": "upcycle.masks.experiments.serving:served_compact"}
"""The names `upcycle serve --source` takes for the methods' factories (anything else is a `module:factory`)."""


@dataclass
class ServedModel:
    """Everything the serving stack needs to serve one set of experts."""

    base: str
    """The base model: a Hugging Face directory or hub id."""
    experts: dict[str, Path] = field(default_factory=dict)
    """{expert name: PEFT LoRA directory}; the names are the `model` values clients send."""
    router: ExpertRouter | None = None
    """Chooses the expert of model "auto"; None: no "auto"."""
    experts_dir: Path | None = None
    """The folder holding every expert as `<name>/` (what `--watch` follows and vLLM's resolver reads), if any."""
    root: Path | None = None
    """The directory served (the default adapter root of /admin/experts)."""
    loader: str | None = None
    """`module:function(path, dtype=...)` that loads `base` when AutoModelForCausalLM cannot (e.g. a compacted
    mask model); None: AutoModelForCausalLM.from_pretrained."""


Source = Callable[..., ServedModel]
"""`source(path, router=True)`: the ServedModel of the directory at `path` (router=False skips loading one)."""


def open_source(path: str | Path, router: bool = True, spec: str = DEFAULT_SOURCE,
                routing: RoutingConfig | None = None) -> ServedModel:
    """The ServedModel that the factory named by `spec` makes of the directory at `path` (with `routing`, when
    given, for its router)."""
    factory: Source = load_factory(SOURCES.get(spec, spec), "--source")
    return factory(path, router=router) if routing is None else factory(path, router=router, routing=routing)
