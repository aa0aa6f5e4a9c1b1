"""Prometheus exposition for one server: HTTP counts plus a collector reading the engine's and cache's stats.

Each app gets its own `CollectorRegistry` (several servers can live in one process, e.g. in tests). The engine and
cache keep plain thread-safe counters (`upcycle.serving.stats`); this collector turns them into metric families at
scrape time, so the hot path never touches prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from upcycle.serving.cache import SWAPS, TIERS
from upcycle.serving.engine import Engine
from upcycle.serving.stats import LatencyStats


def _histogram(name: str, doc: str, stats: dict[str, LatencyStats], label: str) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for key, latency in stats.items():
        family.add_metric([key], latency.cumulative_buckets(), latency.total)
    return family


class EngineCollector:
    """Reads `Engine.stats`, its queue and its adapter cache at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine, stats = self.engine, self.engine.stats
        requests = CounterMetricFamily("upcycle_requests", "Finished generations by outcome", labels=["outcome"])
        for outcome, n in stats.requests.snapshot().items():
            requests.add_metric([outcome], n)
        yield requests
        tokens = CounterMetricFamily("upcycle_tokens", "Prompt and generated tokens", labels=["kind"])
        for kind in ("prompt", "generated"):
            tokens.add_metric([kind], stats.tokens.get(kind))
        yield tokens
        yield GaugeMetricFamily("upcycle_generation_tokens_per_second", "Generated tokens/s over the last 10 s",
                                value=stats.tokens_per_second(10.0))
        yield GaugeMetricFamily("upcycle_queue_depth", "Requests waiting for a batch row", value=engine.queue_depth)
        yield GaugeMetricFamily("upcycle_running", "Requests generating now", value=len(engine.running))
        yield _histogram("upcycle_latency_seconds", "Request, time-to-first-token and step latency", stats.latency,
                         "stage")
        cache = engine.cache
        if cache is None:
            return
        hits = CounterMetricFamily("upcycle_adapter_cache_hits", "Adapter lookups served by a tier", labels=["tier"])
        misses = CounterMetricFamily("upcycle_adapter_cache_misses", "Adapter lookups that fell through a tier",
                                     labels=["tier"])
        evictions = CounterMetricFamily("upcycle_adapter_evictions", "Adapters evicted from a tier",
                                        labels=["tier"])
        for tier in TIERS:
            hits.add_metric([tier], cache.stats.hits.get(tier))
            misses.add_metric([tier], cache.stats.misses.get(tier))
            evictions.add_metric([tier], cache.stats.evictions.get(tier))
        yield from (hits, misses, evictions)
        yield _histogram("upcycle_adapter_swap_seconds", "Time to move an adapter up one tier",
                         {swap: cache.stats.swaps[swap] for swap in SWAPS}, "swap")
        sizes = GaugeMetricFamily("upcycle_adapters", "Adapters per tier (registered = on disk)", labels=["tier"])
        snapshot = cache.snapshot()
        for tier, key in (("registered", "registered"), ("cpu", "cpu"), ("active", "active")):
            sizes.add_metric([tier], snapshot[key])
        yield sizes


def make_registry(engine: Engine) -> tuple[CollectorRegistry, Counter]:
    """A registry with the engine collector and an HTTP request counter (returned for the middleware)."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    http = Counter("upcycle_http_requests", "HTTP requests by route and status", ["route", "status"],
                   registry=registry)
    return registry, http
