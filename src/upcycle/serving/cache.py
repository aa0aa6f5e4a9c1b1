"""Three-tier adapter cache: active slots in the model, an LRU of loaded adapters in CPU memory, and disk.

```
disk (registered PEFT dirs)  --read_adapter + pack-->  CPU LRU (packed adapters)  --load_slot-->  active slot
       any number                                      max count / max bytes, pinnable     fixed count (n_slots)
```
The CPU tier holds each adapter already laid out as the slots hold it (`SlotWriter.pack`, run on the loading
thread), so a CPU -> active move is a few large copies and no per-layer work on the serving thread. A full tier packs
each new adapter into the memory of the one it evicted: fresh pages cost their first touch (5x the copy itself on a
VM), which a server that has been running no longer needs to pay.
On CUDA the active tier is accelerator memory; on CPU it is the model's slot buffers. A running request holds its
slot with `acquire` / `release` (a reference count), so a slot is only ever reused when no row points at it; free
slots are taken before the least recently released one is evicted.

Threads: `acquire` writes slots and must be called from the thread that runs the forwards (the engine loop), so a
slot never changes under a running forward. Prefetches load disk -> CPU on a small thread pool; registration and
removal may come from any thread. One lock guards the bookkeeping; disk reads happen outside it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from upcycle.serving.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterWeights, Buffer, read_adapter, read_buffer
from upcycle.serving.config import CacheConfig
from upcycle.serving.errors import AdapterError, ExpertRemoved, Overloaded, UnknownModel
from upcycle.serving.stats import Counters, LatencyStats

log = logging.getLogger(__name__)

TIERS = ("active", "cpu", "disk")
SWAPS = ("disk_to_cpu", "cpu_to_active")
_CURRENT_COPY_ATTEMPTS = 3  # reads of one adapter that other loads may evict before `acquire` gives up


class Packed(Protocol):
    """An adapter as `SlotWriter.pack` lays it out (`upcycle.ops.batched_lora.PackedAdapter`)."""

    @property
    def nbytes(self) -> int: ...

    def pin_memory(self) -> Packed: ...


class SlotWriter(Protocol):
    """What the cache needs from the model: fixed slots it can fill (`upcycle.ops.batched_lora.MultiLoRA`)."""

    n_slots: int

    def pack(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]], into: Packed | None = None
             ) -> Packed: ...

    def load_slot(self, slot: int, packed: Packed) -> None: ...


@dataclass
class CacheStats:
    """Lookups and swap latencies; read by the Prometheus collector and the benchmark."""

    hits: Counters = field(default_factory=Counters)
    """Per tier: requests whose adapter was found there."""
    misses: Counters = field(default_factory=Counters)
    """Per tier: requests that had to go one tier down (a disk miss is an adapter that failed to load)."""
    swaps: dict[str, LatencyStats] = field(default_factory=lambda: {name: LatencyStats() for name in SWAPS})
    """Seconds per move: disk_to_cpu (read + check) and cpu_to_active (slot fill)."""
    evictions: Counters = field(default_factory=Counters)
    """Per tier: adapters pushed out to make room."""

    def hit_ratio(self, tier: str) -> float | None:
        hits, misses = self.hits.get(tier), self.misses.get(tier)
        return hits / (hits + misses) if hits + misses else None


@dataclass
class _Entry:
    """A registered expert: where it lives and a generation bumped whenever its files change."""

    path: Path
    signature: tuple[int, ...]
    generation: int = 0


def _without_path(error: AdapterError, entry: _Entry) -> str:
    """The error's message with the adapter's directory left out: clients learn what is wrong, not where files are."""
    return str(error).replace(f"{entry.path}{os.sep}", "").replace(str(entry.path), "its directory")


def _signature(path: Path) -> tuple[int, ...]:
    """(mtime_ns, size) of the config and weights; a change means the adapter was rewritten."""
    out: list[int] = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            stat = os.stat(path / name)
            out += [stat.st_mtime_ns, stat.st_size]
        except FileNotFoundError:
            out += [-1, -1]
    return tuple(out)


class AdapterCache:
    """Registered experts and the tiers holding their weights; see the module docstring."""

    def __init__(self, slots: SlotWriter, config: CacheConfig | None = None,
                 check: Callable[[str, AdapterWeights], None] | None = None) -> None:
        self.slots = slots
        self.config = config or CacheConfig()
        self.check = check  # raises AdapterError when the model cannot hold an adapter (targets, rank)
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._registry: dict[str, _Entry] = {}
        self._removed: set[str] = set()
        self._cpu: OrderedDict[str, tuple[int, Packed]] = OrderedDict()  # id -> (generation, weights)
        self._cpu_bytes = 0
        self._cpu_pinned: set[str] = set()
        self._loading: dict[str, Future[Packed]] = {}
        self._spare: list[Packed] = []  # evicted CPU copies whose memory the next load may overwrite
        self._read_buffers: list[Buffer] = []  # what loads read files into, reused (see `read_buffer`)
        self._bad: dict[str, tuple[tuple[int, ...], AdapterError]] = {}
        self._slot_owner: list[tuple[str, int] | None] = [None] * slots.n_slots  # (id, generation) or None
        self._slot_refs = [0] * slots.n_slots
        self._slot_of: dict[str, int] = {}
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # occupied, unreferenced slots, oldest first
        self._eviction_hooks: list[Callable[[str, str], None]] = []
        self._removal_hooks: list[Callable[[str], None]] = []
        self._pool = ThreadPoolExecutor(self.config.prefetch_workers, thread_name_prefix="adapter-prefetch")

    # -- registry ---------------------------------------------------------------------------------------------------
    def register(self, expert: str, path: str | Path) -> bool:
        """Serve `expert` from the PEFT directory `path`; re-registering with changed files drops stale copies.

        Returns True when something changed. Files are only read when the adapter is first needed, so registering
        thousands of experts is cheap and a corrupt one fails only its own requests.
        """
        path = Path(path)
        signature = _signature(path)
        with self._lock:
            old = self._registry.get(expert)
            if old is not None and old.path == path and old.signature == signature:
                return False
            generation = old.generation + 1 if old else 0
            self._registry[expert] = _Entry(path, signature, generation)
            self._removed.discard(expert)
            self._bad.pop(expert, None)
            if old is not None:
                self._forget_copies(expert)
        return True

    def unregister(self, expert: str) -> bool:
        """Stop serving `expert`: drop its copies, and tell removal hooks (the engine fails its waiting requests).

        Rows already generating with it keep their slot until they finish.
        """
        with self._lock:
            if self._registry.pop(expert, None) is None:
                return False
            self._removed.add(expert)
            self._cpu_pinned.discard(expert)
            self._forget_copies(expert)
        for hook in self._removal_hooks:
            hook(expert)
        return True

    def experts(self) -> list[str]:
        """Registered expert ids, sorted."""
        with self._lock:
            return sorted(self._registry)

    def is_registered(self, expert: str) -> bool:
        with self._lock:
            return expert in self._registry

    def add_eviction_hook(self, hook: Callable[[str, str], None]) -> None:
        """Call `hook(tier, expert)` whenever an adapter is evicted from the 'active' or 'cpu' tier."""
        self._eviction_hooks.append(hook)

    def add_removal_hook(self, hook: Callable[[str], None]) -> None:
        """Call `hook(expert)` after an expert is unregistered."""
        self._removal_hooks.append(hook)

    # -- active tier ------------------------------------------------------------------------------------------------
    def acquire(self, expert: str) -> int:
        """The slot holding `expert`, loading it through the tiers if needed; the caller must `release` it.

        Raises UnknownModel / ExpertRemoved / AdapterError (that request only), or Overloaded if every slot is in use.
        """
        with self._lock:
            entry = self._entry(expert)
            slot = self._slot_of.get(expert)
            if slot is not None:
                self.stats.hits.add("active")
                self._slot_refs[slot] += 1
                self._slot_lru.pop(slot, None)
                return slot
            self.stats.misses.add("active")
        for attempt in range(_CURRENT_COPY_ATTEMPTS):
            weights = self._weights(expert, count=attempt == 0)
            with self._lock:
                if self._registry.get(expert) is not entry:
                    raise ExpertRemoved(f"expert '{expert}' was removed or replaced while its adapter loaded")
                if self._cpu.get(expert, (None, None))[1] is not weights:
                    continue  # other loads evicted it meanwhile, so its memory may be reused (`_spare`): read again
                slot, evicted = self._fill_slot(expert, entry, weights)
            if evicted is not None:
                self._fire_eviction("active", evicted)
            return slot
        raise Overloaded(f"expert '{expert}' was pushed out of the CPU tier {_CURRENT_COPY_ATTEMPTS} times while it "
                         f"loaded; raise --engine.cache.cpu_max_adapters (now {self.config.cpu_max_adapters})")

    def _fill_slot(self, expert: str, entry: _Entry, weights: Packed) -> tuple[int, str | None]:
        """Write `weights` into a free or least recently released slot (lock held); returns it and the expert it
        evicted, if any."""
        slot = self._free_slot()
        if slot is None:
            raise Overloaded(f"all {self.slots.n_slots} adapter slots are in use; retry shortly")
        evicted = None
        if self._slot_owner[slot] is not None:
            evicted = self._slot_owner[slot][0]
            self._slot_of.pop(evicted, None)
            self.stats.evictions.add("active")
        start = time.perf_counter()
        self.slots.load_slot(slot, weights)
        self.stats.swaps["cpu_to_active"].observe(time.perf_counter() - start)
        self._slot_owner[slot] = (expert, entry.generation)
        self._slot_of[expert] = slot
        self._slot_refs[slot] = 1
        return slot, evicted

    def release(self, slot: int) -> None:
        """A row stopped using `slot`; it stays loaded (most recently used) until evicted."""
        with self._lock:
            self._slot_refs[slot] -= 1
            if self._slot_refs[slot] < 0:
                raise RuntimeError(f"slot {slot} released more often than acquired")
            if self._slot_refs[slot] == 0:
                if self._slot_owner[slot] is None:
                    return  # its expert was removed or replaced meanwhile: the slot is simply free now
                self._slot_lru[slot] = None

    def _free_slot(self) -> int | None:
        for slot, owner in enumerate(self._slot_owner):
            if owner is None and self._slot_refs[slot] == 0:
                return slot
        if self._slot_lru:
            slot, _ = self._slot_lru.popitem(last=False)
            return slot
        return None

    # -- CPU tier ---------------------------------------------------------------------------------------------------
    def prefetch(self, expert: str) -> Future[Packed] | None:
        """Start loading `expert` into CPU memory in the background; None if it is resident (or unknown)."""
        with self._lock:
            if expert not in self._registry or expert in self._slot_of or expert in self._cpu:
                return None
            running = self._loading.get(expert)
            if running is not None:
                return running
        return self._pool.submit(self._weights, expert, False)

    def is_resident(self, expert: str) -> bool:
        """True when `acquire` would not touch the disk (active or CPU tier)."""
        with self._lock:
            return expert in self._slot_of or expert in self._cpu

    def tier_of(self, expert: str) -> str | None:
        """The fastest tier holding `expert` now: 'active', 'cpu', 'disk', or None if unregistered."""
        with self._lock:
            if expert in self._slot_of:
                return "active"
            if expert in self._cpu:
                return "cpu"
            return "disk" if expert in self._registry else None

    def pin(self, expert: str) -> None:
        """Keep `expert` in CPU memory regardless of LRU pressure (loads it now)."""
        self._weights(expert, count=False)
        with self._lock:
            self._cpu_pinned.add(expert)

    def unpin(self, expert: str) -> None:
        with self._lock:
            self._cpu_pinned.discard(expert)

    def _weights(self, expert: str, count: bool) -> Packed:
        """The packed CPU copy of `expert`, read from disk by this thread or awaited from another's read."""
        with self._lock:
            entry = self._entry(expert)
            cached = self._cpu.get(expert)
            if cached is not None and cached[0] == entry.generation:
                self._cpu.move_to_end(expert)
                if count:
                    self.stats.hits.add("cpu")
                return cached[1]
            if count:
                self.stats.misses.add("cpu")
            future = self._loading.get(expert)
            owner = future is None
            if owner:
                future = self._loading[expert] = Future()
        if owner:
            self._load(expert, entry, future)
        return future.result()

    def _load(self, expert: str, entry: _Entry, future: Future[Packed]) -> None:
        bad = None
        try:
            bad = self._bad.get(expert)
            if bad is not None and bad[0] == _signature(entry.path):
                # same files that failed before: fail fast instead of re-reading (a fresh traceback, or the
                # stored error's would grow by a few frames each time a client asks again)
                raise bad[1].with_traceback(None)
            start = time.perf_counter()
            with self._lock:
                scratch = self._read_buffers.pop() if self._read_buffers else None
            adapter = read_adapter(entry.path, into=scratch)
            if self.check is not None:
                self.check(expert, adapter)
            with self._lock:
                spare = self._spare.pop() if self._spare else None
            weights = self.slots.pack(adapter.modules, into=spare)
            if self.config.pin_memory and spare is None:  # a spare is pinned already
                weights = weights.pin_memory()
            if scratch is None or len(scratch) < adapter.nbytes:  # it was not used: keep one that fits next time
                scratch = read_buffer(adapter.nbytes)
            del adapter  # packed: nothing views `scratch` any more, so the next load may overwrite it
            with self._lock:
                if len(self._read_buffers) < self._loading_threads:
                    self._read_buffers.append(scratch)
            self.stats.swaps["disk_to_cpu"].observe(time.perf_counter() - start)
            self.stats.hits.add("disk")
        except Exception as error:  # any failure to read or check one adapter is that adapter's error only
            if not isinstance(error, AdapterError):
                log.exception("expert %s: unexpected error loading %s", expert, entry.path)
                error = AdapterError(f"{type(error).__name__}: {error}")
            self.stats.misses.add("disk")
            if bad is None or error is not bad[1]:  # logged once, not on every request for a known-bad adapter
                log.warning("expert %s: %s", expert, error)
            with self._lock:
                self._bad[expert] = (_signature(entry.path), error)
                self._loading.pop(expert, None)
            future.set_exception(AdapterError(f"expert '{expert}' cannot be served: {_without_path(error, entry)}"))
            return
        except BaseException as error:  # never leave waiters hanging
            with self._lock:
                self._loading.pop(expert, None)
            future.set_exception(error)
            raise
        evicted: list[str] = []
        with self._lock:
            self._loading.pop(expert, None)
            if self._registry.get(expert) is entry:  # not removed or replaced while reading
                self._cpu[expert] = (entry.generation, weights)
                self._cpu_bytes += weights.nbytes
                evicted = self._shrink_cpu(keep=expert)
        future.set_result(weights)
        for name in evicted:
            self._fire_eviction("cpu", name)

    def _shrink_cpu(self, keep: str) -> list[str]:
        """Evict least recently used, unpinned CPU copies until both limits hold; returns the evicted ids."""
        evicted = []
        for name in list(self._cpu):
            over = (len(self._cpu) > self.config.cpu_max_adapters
                    or (self.config.cpu_max_bytes is not None and self._cpu_bytes > self.config.cpu_max_bytes))
            if not over:
                break
            if name == keep or name in self._cpu_pinned:
                continue
            weights = self._cpu.pop(name)[1]
            self._cpu_bytes -= weights.nbytes
            if len(self._spare) < self._loading_threads:
                self._spare.append(weights)
            self.stats.evictions.add("cpu")
            evicted.append(name)
        return evicted

    # -- helpers ----------------------------------------------------------------------------------------------------
    @property
    def _loading_threads(self) -> int:
        """Threads that may load at once (the prefetch pool and a caller of `acquire`): how many spare CPU copies and
        read buffers are worth keeping."""
        return self.config.prefetch_workers + 1

    def _entry(self, expert: str) -> _Entry:
        entry = self._registry.get(expert)
        if entry is None:
            if expert in self._removed:
                raise ExpertRemoved(f"expert '{expert}' was removed from this server")
            raise UnknownModel(f"the model '{expert}' does not exist", param="model")
        return entry

    def _forget_copies(self, expert: str) -> None:
        """Drop the CPU copy and the slot mapping (a referenced slot frees itself on its last release)."""
        cached = self._cpu.pop(expert, None)
        if cached is not None:
            self._cpu_bytes -= cached[1].nbytes
        slot = self._slot_of.pop(expert, None)
        if slot is not None:
            self._slot_owner[slot] = None
            self._slot_lru.pop(slot, None)

    def _fire_eviction(self, tier: str, expert: str) -> None:
        for hook in self._eviction_hooks:
            try:
                hook(tier, expert)
            except Exception:  # a broken hook must not break serving
                log.exception("eviction hook failed")

    def snapshot(self) -> dict[str, int]:
        """Sizes of the tiers now (for /metrics and the admin listing)."""
        with self._lock:
            return {"registered": len(self._registry), "cpu": len(self._cpu), "cpu_bytes": self._cpu_bytes,
                    "active": len(self._slot_of), "active_in_use": sum(r > 0 for r in self._slot_refs),
                    "slots": self.slots.n_slots}

    def close(self) -> None:
        """Stop the prefetch threads (waiting for loads in progress)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
