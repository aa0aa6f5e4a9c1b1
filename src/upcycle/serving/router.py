"""What the server needs from a router: one expert name per request text, and the names it can choose from.

Any method plugs in here: introvert's centroid router (`upcycle.introvert.router.EmbeddingRouter`) routes whole
sequences by their embedding; a router for another method only has to have these two members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

BASE, AUTO = "base", "auto"
"""The two model names that are not experts: the base alone, and the expert the router picks for the request."""


@runtime_checkable
class ExpertRouter(Protocol):
    """Chooses one expert per request text (model "auto"), e.g. by the nearest cluster centroid of its embedding."""

    @property
    def experts(self) -> Sequence[str]:
        """Every expert name `route` can answer with."""
        ...

    def route(self, texts: list[str]) -> list[str]:
        """One expert name (`expert-00003`) per text, in order."""
        ...


class FixedRouter:
    """Sends everything to one expert; for smoke tests and as the simplest example of the protocol."""

    def __init__(self, expert: str) -> None:
        self.expert = expert

    @property
    def experts(self) -> list[str]:
        return [self.expert]

    def route(self, texts: list[str]) -> list[str]:
        return [self.expert] * len(texts)


def load_factory(spec: str, flag: str):
    """The callable named by `package.module:factory` (a UserError naming `flag` when it cannot be found)."""
    import importlib

    from upcycle.errors import UserError

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"{flag} must look like 'package.module:factory', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UserError(f"cannot load {flag.lstrip('-')} {spec!r}: {error}") from None


def load_router(spec: str, path: str) -> ExpertRouter:
    """Build a router from `module:factory`; the factory is called with the served directory's path."""
    from upcycle.errors import UserError

    router = load_factory(spec, "--router")(path)
    if not isinstance(router, ExpertRouter):
        raise UserError(f"{spec} returned {type(router).__name__}, which lacks route(texts) or experts")
    return router
