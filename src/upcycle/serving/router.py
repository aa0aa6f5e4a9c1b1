"""What the server needs from a sequence router: expert ids for whole requests (MoIN routes per sequence)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

BASE, AUTO = "base", "auto"
"""The two model names that are not experts: the base alone, and the expert the router picks for the request."""


@runtime_checkable
class SequenceRouter(Protocol):
    """Chooses one expert per request text, e.g. by the nearest cluster centroid of its embedding."""

    def route(self, texts: list[str]) -> list[str]:
        """One expert id (`expert-00003`) per text, in order."""
        ...


class FixedRouter:
    """Sends everything to one expert; for smoke tests and as the simplest example of the protocol."""

    def __init__(self, expert: str) -> None:
        self.expert = expert

    def route(self, texts: list[str]) -> list[str]:
        return [self.expert] * len(texts)


def load_router(spec: str, run_path: str):
    """Build a router from `module:factory`; the factory is called with the run directory's path."""
    import importlib

    from upcycle.errors import UserError

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"--router must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UserError(f"cannot load router {spec!r}: {error}") from None
    router = factory(run_path)
    if not isinstance(router, SequenceRouter):
        raise UserError(f"{spec} returned {type(router).__name__}, which has no route(texts) method")
    return router
