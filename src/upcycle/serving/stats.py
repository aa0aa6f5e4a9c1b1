"""Thread-safe latency and count recorders, with no Prometheus dependency (the server's collector reads them)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

# Seconds; spans a slot copy (~0.1 ms) to a slow disk load or a long generation.
DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


@dataclass
class LatencyStats:
    """Count, sum and cumulative-ready bucket counts of observations, plus a window of recent ones for percentiles."""

    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    """Upper bounds (seconds) of the histogram buckets; +Inf is implied."""
    window: int = 20_000
    """How many recent observations `percentile` looks at."""
    count: int = 0
    total: float = 0.0
    bucket_counts: list[int] = field(default_factory=list)
    recent: deque[float] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.bucket_counts = [0] * (len(self.buckets) + 1)
        self.recent = deque(maxlen=self.window)

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.count += 1
            self.total += seconds
            self.bucket_counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.recent.append(seconds)

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100) of the recent window, or None before any observation."""
        with self._lock:
            values = sorted(self.recent)
        if not values:
            return None
        rank = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
        return values[rank]

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """[(upper bound as text, cumulative count)], ending with '+Inf', as Prometheus histograms want."""
        with self._lock:
            counts = list(self.bucket_counts)
        out, running = [], 0
        for bound, n in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class Counters:
    """A thread-safe Counter of string keys."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def get(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
