"""What the server needs from a router: the expert names it can choose from and, per request text, where to go.

Any method plugs in here: introvert's centroid router (`upcycle.introvert.router.EmbeddingRouter`, adapted in
`upcycle.introvert.serving`) routes whole sequences by their embedding; a router for another method only has to have
the two members of `ExpertRouter`. A router that also has `decide(texts, top_k)` (`MixingRouter`) can send a request to
a weighted mixture of k experts (c-BTM), or to the base model when the request is out of its domain, and say how
confident it is; `route_requests` asks whichever the router has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from upcycle.serving.errors import InvalidRequest

BASE, AUTO = "base", "auto"
"""The two model names that are not experts: the base alone, and the expert the router picks for the request."""


@dataclass(frozen=True)
class RouteDecision:
    """Where one request goes: no expert (the base model), one expert, or a weighted mixture of k experts."""

    experts: tuple[str, ...]
    """Expert names, nearest first; empty: the base model."""
    weights: tuple[float, ...] = ()
    """Mixture weight of each expert (summing to 1); empty: equal weights."""
    in_domain: bool = True
    """False when the router judged the request outside every expert's domain (its out-of-domain guard)."""
    confidence: float | None = None
    """How typical the request is of the experts' data, in [0, 1] (None: the router does not say)."""

    def __post_init__(self) -> None:
        if self.weights and len(self.weights) != len(self.experts):
            raise ValueError(f"{len(self.experts)} experts but {len(self.weights)} weights")

    @property
    def mixture_weights(self) -> tuple[float, ...]:
        """`weights`, or equal weights when the router gave none."""
        return self.weights or tuple(1.0 / len(self.experts) for _ in self.experts)

    @property
    def label(self) -> str:
        """The experts comma-separated, or 'base' (the expert header's value)."""
        return ",".join(self.experts) or BASE


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


@runtime_checkable
class MixingRouter(ExpertRouter, Protocol):
    """An `ExpertRouter` that can also mix the top k experts and send out-of-domain requests elsewhere."""

    def decide(self, texts: list[str], top_k: int | None = None) -> list[RouteDecision]:
        """One decision per text (a RouteDecision, or any object with its four fields); `top_k` overrides the
        router's own default number of experts mixed."""
        ...


def route_requests(router: ExpertRouter, texts: list[str], top_k: int | None = None) -> list[RouteDecision]:
    """The decision of each text for model "auto" with `top_k` (None: the router's default). A router with only
    `route` answers top_k 1; InvalidRequest (param top_k) for a top_k it cannot serve."""
    if top_k is not None and not 1 <= top_k <= len(router.experts):
        raise InvalidRequest(f"top_k must be between 1 and the number of experts ({len(router.experts)}), "
                             f"got {top_k}", param="top_k")
    if isinstance(router, MixingRouter):
        return [RouteDecision(tuple(d.experts), tuple(d.weights), bool(d.in_domain), d.confidence)
                for d in router.decide(texts, top_k)]
    if top_k not in (None, 1):
        raise InvalidRequest(f"this server's router picks one expert per request, so top_k must be 1, got {top_k}",
                             param="top_k")
    return [RouteDecision((expert,), (1.0,)) for expert in router.route(texts)]


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
