"""The three-tier adapter cache: tier moves, LRU with pinning, eviction hooks, prefetch, removal, corrupt files."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from upcycle.introvert.run import Run
from upcycle.serving.adapters import WEIGHTS_NAME, read_adapter
from upcycle.serving.cache import AdapterCache
from upcycle.serving.config import CacheConfig
from upcycle.serving.errors import AdapterError, ExpertRemoved, Overloaded, UnknownModel


class FakeSlots:
    """Records what each slot holds instead of writing model buffers."""

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.held: dict[int, dict] = {}
        self.writes = 0

    def pack(self, weights: dict, into: _Packed | None = None) -> _Packed:
        # a copy, as the real pack makes: `weights` view the cache's read buffer, which the next load overwrites
        weights = {name: (a.clone(), b.clone(), scaling) for name, (a, b, scaling) in weights.items()}
        if into is not None:  # what the real pack does: the evicted copy's memory now holds these weights
            into.weights = weights
            return into
        return _Packed(weights)

    def load_slot(self, slot: int, packed: _Packed) -> None:
        self.held[slot] = packed.weights
        self.writes += 1


class _Packed:
    """The modules as given, with the size the cache accounts."""

    def __init__(self, weights: dict) -> None:
        self.weights = weights
        self.nbytes = sum(a.nbytes + b.nbytes for a, b, _ in weights.values())


@pytest.fixture
def run_copy(fake_run_dir, tmp_path) -> Run:
    """A private copy of the fake run, so tests may corrupt or delete files."""
    shutil.copytree(fake_run_dir, tmp_path / "run")
    return Run.open(tmp_path / "run")


def _cache(run: Run, n_slots: int = 2, **config) -> tuple[AdapterCache, FakeSlots]:
    slots = FakeSlots(n_slots)
    cache = AdapterCache(slots, CacheConfig(**config))
    for expert in run.expert_ids():
        cache.register(expert, run.expert_dir(expert))
    return cache, slots


def test_first_acquire_goes_through_every_tier_then_hits_active(run_copy):
    cache, slots = _cache(run_copy)
    assert cache.tier_of("expert-00001") == "disk"
    slot = cache.acquire("expert-00001")
    assert cache.tier_of("expert-00001") == "active"
    assert slots.held[slot]  # weights were written to that slot
    cache.release(slot)
    assert cache.acquire("expert-00001") == slot
    stats = cache.stats
    assert (stats.hits.get("active"), stats.misses.get("active")) == (1, 1)
    assert (stats.hits.get("cpu"), stats.misses.get("cpu"), stats.hits.get("disk")) == (0, 1, 1)
    assert stats.swaps["disk_to_cpu"].count == 1 and stats.swaps["cpu_to_active"].count == 1
    cache.close()


def test_slots_evict_least_recently_released_and_never_a_referenced_one(run_copy):
    cache, slots = _cache(run_copy, n_slots=2)
    evicted = []
    cache.add_eviction_hook(lambda tier, expert: evicted.append((tier, expert)))
    held = cache.acquire("expert-00000")  # stays referenced
    cache.release(cache.acquire("expert-00001"))
    cache.acquire("expert-00002")  # must take expert-00001's slot
    assert evicted == [("active", "expert-00001")]
    assert cache.tier_of("expert-00000") == "active" and cache.tier_of("expert-00001") == "cpu"
    with pytest.raises(Overloaded):
        cache.acquire("expert-00003")  # both slots referenced
    cache.release(held)
    cache.acquire("expert-00003")
    assert evicted[-1] == ("active", "expert-00000")
    cache.close()


def test_cpu_tier_lru_by_count_and_bytes_with_pinning(run_copy):
    cache, _ = _cache(run_copy, n_slots=1, cpu_max_adapters=2)
    evicted = []
    cache.add_eviction_hook(lambda tier, expert: evicted.append((tier, expert)) if tier == "cpu" else None)
    cache.pin("expert-00000")
    for expert in ("expert-00001", "expert-00002", "expert-00003"):
        cache.release(cache.acquire(expert))
    assert cache.tier_of("expert-00000") == "cpu"  # pinned survives although least recently used
    assert [e for _, e in evicted] == ["expert-00001", "expert-00002"]
    cache.close()

    cache, _ = _cache(run_copy, n_slots=1, cpu_max_bytes=1)  # every adapter is larger than 1 byte
    cache.release(cache.acquire("expert-00000"))
    cache.release(cache.acquire("expert-00001"))
    assert cache.snapshot()["cpu"] == 1  # only the newest is kept
    cache.close()


def test_prefetch_loads_once_and_turns_the_acquire_into_a_cpu_hit(run_copy):
    cache, _ = _cache(run_copy)
    futures = []
    threads = [threading.Thread(target=lambda: futures.append(cache.prefetch("expert-00002"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for future in futures:
        if future is not None:
            future.result(timeout=10)
    assert cache.stats.hits.get("disk") == 1  # eight concurrent prefetches, one disk read
    assert cache.is_resident("expert-00002") and cache.prefetch("expert-00002") is None
    cache.acquire("expert-00002")
    assert cache.stats.hits.get("cpu") == 1
    cache.close()


def test_corrupt_adapter_fails_only_itself_and_recovers_when_rewritten(run_copy):
    cache, _ = _cache(run_copy)
    weights = run_copy.expert_dir("expert-00001") / WEIGHTS_NAME
    good = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10)
    cache.register("expert-00001", run_copy.expert_dir("expert-00001"))  # files changed: re-register
    with pytest.raises(AdapterError, match="expert-00001"):
        cache.acquire("expert-00001")
    with pytest.raises(AdapterError):  # remembered: same bytes fail fast
        cache.acquire("expert-00001")
    assert cache.stats.misses.get("disk") == 2
    cache.release(cache.acquire("expert-00002"))  # others unaffected
    weights.write_bytes(good)
    assert cache.register("expert-00001", run_copy.expert_dir("expert-00001"))
    cache.acquire("expert-00001")
    cache.close()


def test_adapter_too_large_for_the_model_is_an_adapter_error(run_copy):
    def check(expert, weights):
        if weights.rank > 2:
            raise AdapterError(f"rank {weights.rank} exceeds max_rank 2")

    cache = AdapterCache(FakeSlots(1), check=check)
    cache.register("expert-00000", run_copy.expert_dir("expert-00000"))
    with pytest.raises(AdapterError, match="max_rank"):
        cache.acquire("expert-00000")
    cache.close()


def test_unregister_fails_newcomers_and_frees_the_slot_after_the_last_release(run_copy):
    cache, _ = _cache(run_copy, n_slots=1)
    removed = []
    cache.add_removal_hook(removed.append)
    slot = cache.acquire("expert-00000")
    assert cache.unregister("expert-00000") and removed == ["expert-00000"]
    with pytest.raises(ExpertRemoved):
        cache.acquire("expert-00000")
    with pytest.raises(UnknownModel):
        cache.acquire("expert-99999")
    with pytest.raises(Overloaded):  # the running row still holds the only slot
        cache.acquire("expert-00001")
    cache.release(slot)
    assert cache.acquire("expert-00001") == slot
    assert cache.register("expert-00000", run_copy.expert_dir("expert-00000"))  # can come back
    cache.close()


def test_cache_fills_real_model_slots(run_copy, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from upcycle.ops.batched_lora import attach_multi_lora
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=2, max_rank=8)
    cache = AdapterCache(lora)
    cache.register("expert-00003", Path(run_copy.expert_dir("expert-00003")))
    slot = cache.acquire("expert-00003")
    layer = lora.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_a[slot, :4].abs().sum() > 0 and torch.all(layer.lora_a[slot, 4:] == 0)
    cache.close()


def test_loads_reuse_one_read_buffer_and_every_cpu_copy_stays_its_own(run_copy, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from upcycle.ops.batched_lora import attach_multi_lora
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    lora = attach_multi_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), DEFAULT_TARGETS, n_slots=1,
                             max_rank=8)
    cache = AdapterCache(lora, CacheConfig(prefetch_workers=1))
    experts = run_copy.expert_ids()[:4]
    for expert in experts:
        cache.register(expert, run_copy.expert_dir(expert))
        cache.release(cache.acquire(expert))
    assert len(cache._read_buffers) == 1  # made after the first load, reused by the others
    for expert in experts:  # later reads into the same buffer left the earlier packed copies alone
        expected = lora.pack(read_adapter(run_copy.expert_dir(expert)).modules)
        held = cache._cpu[expert][1]
        assert all(torch.equal(x, y) for x, y in zip(held.a + held.bt, expected.a + expected.bt, strict=True))
    cache.close()


def test_a_full_cpu_tier_packs_each_new_adapter_into_the_evicted_ones_memory(run_copy):
    cache, slots = _cache(run_copy, n_slots=1, cpu_max_adapters=1)
    experts = ["expert-00000", "expert-00001", "expert-00002"]
    copies = []
    for expert in experts:
        cache.release(cache.acquire(expert))
        copies.append(cache._cpu[expert][1])
        expected = read_adapter(run_copy.expert_dir(expert)).modules
        assert slots.held[0].keys() == expected.keys()  # the slot got this expert's weights, not the evicted one's
        assert all(torch.equal(slots.held[0][name][0], a) for name, (a, _, _) in expected.items())
    # the second load evicts the first copy after packing; from then on each load reuses the last eviction's memory
    assert copies[1] is not copies[0] and copies[2] is copies[0]
    cache.close()


def test_an_adapter_evicted_while_it_loads_is_read_again_not_taken_from_reused_memory(run_copy):
    cache, slots = _cache(run_copy, n_slots=1, cpu_max_adapters=1)
    weights = cache._weights
    raced = []

    def evicted_after_reading(expert: str, count: bool):
        packed = weights(expert, count)
        if not raced:  # another thread's load pushes it out (and may write into its memory) before the slot fill
            raced.append(weights("expert-00003", False))
        return packed

    cache._weights = evicted_after_reading
    cache.acquire("expert-00001")
    assert raced[0] is not None and cache.tier_of("expert-00003") == "disk"  # evicted in turn by the second read
    expected = read_adapter(run_copy.expert_dir("expert-00001")).modules
    assert all(torch.equal(slots.held[0][name][0], a) for name, (a, _, _) in expected.items())
    assert cache.stats.hits.get("disk") == 3  # expert-00001, expert-00003, expert-00001 again
    cache.close()


def test_an_adapter_evicted_on_every_read_is_an_overload_with_what_to_raise(run_copy):
    cache, _ = _cache(run_copy, n_slots=1, cpu_max_adapters=1)
    weights = cache._weights

    def always_evicted(expert: str, count: bool):
        packed = weights(expert, count)
        with cache._lock:
            cache._cpu.pop(expert)
        return packed

    cache._weights = always_evicted
    with pytest.raises(Overloaded, match="raise --engine.cache.cpu_max_adapters"):
        cache.acquire("expert-00001")
    cache.close()
