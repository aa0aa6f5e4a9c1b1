"""Serving benchmark: base vs routed generation, and adapter swap latency per tier next to PEFT's load_adapter.

Everything is measured in one run on one tiny Llama (hidden 128, 4 layers, ffn 384, vocab 4096, random weights) with
N random r=8 LoRA experts on all seven projections, generated into a temporary directory:

- generation tokens/s and p50/p99 request latency for the base model and for routed traffic over N in {1, 100, 1000}
  experts, with uniform and Zipf(s) expert popularity, at concurrency 1 and 16 (closed loop: each client sends its
  next request when the previous one finishes), through the batching engine in-process (no HTTP);
- adapter swap latency p50/p99 per tier (disk -> CPU, CPU -> active slot) and PEFT's `load_adapter` of the same files;
- adapter cache hit ratios per tier for every routed configuration.

All configurations of one concurrency level are built and warmed first, then timed in interleaved rounds (the order
rotating each round), so load from other processes on a shared machine falls on all of them alike.

"base" runs the same engine with no adapter selected (the wrapped layers' no-adapter path); "base_unwrapped" is an
engine over the plain model, the strictest reference. The expert files are fresh, so "disk" reads come from the OS
page cache. Prints one JSON object. Usage: `python benchmarks/serve.py [--quick] [--out result.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from upcycle.serving.cache import CacheStats  # noqa: E402
from upcycle.serving.config import CacheConfig, EngineConfig
from upcycle.serving.engine import Engine, EngineStats  # noqa: E402
from upcycle.serving.errors import ServingError  # noqa: E402
from upcycle.serving.sampling import SamplingParams  # noqa: E402


def prompts(engine: Engine, n: int, seed: int) -> list[list[int]]:
    """`n` prompts of 16-48 tokens cut from standard-library text."""
    from upcycle.data.corpus import stdlib_root

    ids = engine.encode((stdlib_root() / "heapq.py").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(16, 48)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start: start + length])
    return out


def popularity(n_experts: int, n_requests: int, kind: str, zipf_s: float, seed: int) -> list[str]:
    """Expert id of each request: uniform over N, or Zipf(s) over a fixed random ranking of the N."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        picks = rng.integers(0, n_experts, n_requests)
    else:
        weights = 1.0 / np.arange(1, n_experts + 1) ** zipf_s
        ranking = rng.permutation(n_experts)
        picks = ranking[rng.choice(n_experts, n_requests, p=weights / weights.sum())]
    return [f"expert-{int(i):05d}" for i in picks]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Tally:
    """What the timed passes of one configuration add up to."""

    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    errors: int = 0
    per_round: list[float] = field(default_factory=list)
    """tokens/s of each timed round; their median is the headline (robust to a neighbour's burst of load)."""

    def summary(self) -> dict:
        return {"requests": len(self.latencies), "errors": self.errors, "generated_tokens": self.tokens,
                "tokens_per_s": round(statistics.median(self.per_round), 1) if self.per_round else None,
                "tokens_per_s_mean": round(self.tokens / self.wall, 1) if self.wall else None,
                "latency_p50_ms": round(percentile(self.latencies, 50) * 1e3, 2),
                "latency_p99_ms": round(percentile(self.latencies, 99) * 1e3, 2), "wall_s": round(self.wall, 2)}


def drive(engine: Engine, work: list[tuple[list[int], str | None]], concurrency: int, max_tokens: int,
          tally: Tally) -> None:
    """Closed loop: `concurrency` clients send the requests of `work` one after another; adds to `tally`."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    queue = iter(work)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            prompt, expert = item
            start = time.perf_counter()
            try:
                result = engine.generate(prompt, expert, params, timeout=300)
            except ServingError:
                with lock:
                    tally.errors += 1
                continue
            with lock:
                tally.latencies.append(time.perf_counter() - start)
                tally.tokens += len(result.token_ids)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    tokens_before, start = tally.tokens, time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tally.wall += wall
    tally.per_round.append((tally.tokens - tokens_before) / wall)


def engine_config(concurrency: int, cpu_adapters: int) -> EngineConfig:
    return EngineConfig(max_batch=max(concurrency, 1), max_seq_len=128, n_slots=max(2 * concurrency, 2),
                        max_rank=8, torch_threads=1, merge_single_adapter=True,
                        cache=CacheConfig(cpu_max_adapters=cpu_adapters))


def measure_interleaved(configs: dict[str, tuple], concurrency: int, max_tokens: int, rounds: int) -> dict:
    """{name: (make_engine, timed work, warm-up work)} -> {name: summary}, timed in interleaved rounds."""
    engines = {name: make().start() for name, (make, _, _) in configs.items()}
    try:
        for name, (_, _, warm) in configs.items():  # fill the caches as steady traffic would (short generations)
            drive(engines[name], warm, concurrency, 2, Tally())
            engines[name].stats = EngineStats()
            if engines[name].cache is not None:
                engines[name].cache.stats = CacheStats()
        tallies = {name: Tally() for name in configs}
        names = list(configs)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                drive(engines[name], configs[name][1][r::rounds], concurrency, max_tokens, tallies[name])
        out = {}
        for name, engine in engines.items():
            out[name] = tallies[name].summary()
            if engine.cache is not None and engine.cache.experts():
                stats = engine.cache.stats
                out[name]["hit_ratio"] = {tier: _round(stats.hit_ratio(tier)) for tier in ("active", "cpu")}
                out[name]["disk_loads"] = stats.hits.get("disk")
        return out
    finally:
        for engine in engines.values():
            engine.close()


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def swap_latency(run_dir: Path, base_dir: Path, n: int) -> dict:
    """Per tier: disk -> CPU (read + check) and CPU -> active (slot fill), over `n` distinct experts."""
    from upcycle.introvert.run import Run

    run = Run.open(run_dir)
    experts = {e: run.expert_dir(e) for e in run.expert_ids()[:n]}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    engine = Engine.from_model(model, AutoTokenizer.from_pretrained(base_dir), experts,
                               EngineConfig(max_batch=1, n_slots=1, max_rank=8, torch_threads=1,
                                            cache=CacheConfig(cpu_max_adapters=n + 1)))
    cache = engine.cache
    disk_to_active = []
    for expert in experts:  # cold: every acquire reads the disk, then fills the single slot
        start = time.perf_counter()
        cache.release(cache.acquire(expert))
        disk_to_active.append(time.perf_counter() - start)
    for expert in experts:  # now all in CPU memory; one slot, so every acquire is a CPU -> active swap
        cache.release(cache.acquire(expert))
    stats = cache.stats
    out = {}
    for swap in ("disk_to_cpu", "cpu_to_active"):
        values = list(stats.swaps[swap].recent)
        out[swap] = {"p50_ms": round(percentile(values, 50) * 1e3, 3), "p99_ms": round(percentile(values, 99) * 1e3, 3),
                     "samples": len(values)}
    out["disk_to_active"] = {"p50_ms": round(percentile(disk_to_active, 50) * 1e3, 3),
                             "p99_ms": round(percentile(disk_to_active, 99) * 1e3, 3), "samples": len(disk_to_active)}
    out["adapter_bytes"] = next(iter(cache._cpu.values()))[1].nbytes
    engine.close()
    return out


def peft_load_adapter(run_dir: Path, base_dir: Path, n: int) -> dict:
    """PEFT's `load_adapter` of the same adapter files into one PeftModel (deleting each after, to stay bounded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from upcycle.introvert.run import Run

    run = Run.open(run_dir)
    ids = run.expert_ids()[: n + 1]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run.expert_dir(ids[0]))
    times = []
    for i, expert in enumerate(ids[1:]):
        start = time.perf_counter()
        model.load_adapter(run.expert_dir(expert), adapter_name=f"a{i}")
        model.set_adapter(f"a{i}")
        times.append(time.perf_counter() - start)
        model.set_adapter("default")
        model.delete_adapter(f"a{i}")
    return {"p50_ms": round(percentile(times, 50) * 1e3, 3), "p99_ms": round(percentile(times, 99) * 1e3, 3),
            "samples": len(times), "what": "PeftModel.load_adapter + set_adapter"}


def op_overhead(hidden_sizes: tuple[int, ...] = (128, 512, 2048), rows: int = 16, slots: int = 32,
                rank: int = 8) -> dict:
    """Per wrapped layer at decode (16 rows, all different adapters): base matmul time vs the gathered LoRA op's.

    Shows how the LoRA cost, mostly fixed per-op overhead, shrinks relative to the base layer as hidden grows.
    """
    from upcycle.ops.batched_lora import lora_bgmv

    def timed(fn, reps: int = 300) -> float:
        for _ in range(20):
            fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - start) / reps)
        return best

    out = {}
    for hidden in hidden_sizes:
        x, weight = torch.randn(rows, 1, hidden), torch.randn(hidden, hidden)
        lora_a = torch.randn(slots + 1, rank, hidden)
        lora_b = torch.randn(slots + 1, rank, hidden).transpose(1, 2)  # R-major, as MultiLoRALinear stores it
        idx = torch.randperm(slots)[:rows]
        base_s = timed(lambda: torch.nn.functional.linear(x, weight))  # noqa: B023 (used at once)
        lora_s = timed(lambda: lora_bgmv(x, torch.nn.functional.linear(x, weight), lora_a, lora_b, idx))  # noqa: B023
        out[f"hidden_{hidden}"] = {"linear_us": round(base_s * 1e6, 1), "linear_plus_lora_us": round(lora_s * 1e6, 1),
                                   "ratio": round(base_s / lora_s, 3)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="1,100,1000", help="comma-separated N")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per configuration, concurrency 1")
    parser.add_argument("--requests16", type=int, default=384, help="timed requests per configuration, concurrency 16")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cpu-adapters", type=int, default=512, help="CPU tier capacity (adapters; the default)")
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--swap-samples", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.experts.split(",")]
    if args.quick:
        sizes, args.requests, args.requests16, args.max_tokens, args.swap_samples = [1, 20], 4, 32, 8, 10
        args.rounds = 2
    torch.set_num_threads(1)
    began = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.introvert.serving import write_synthetic_run
    from upcycle.serving.synthetic import save_tiny_base

    with tempfile.TemporaryDirectory(prefix="upcycle-serve-bench-") as tmp:
        tmp = Path(tmp)
        base_dir = save_tiny_base(tmp / "base")  # hidden 128, 4 layers, ffn 384, vocab 4096
        start = time.perf_counter()
        run_dir = tmp / "run"
        write_synthetic_run(run_dir, base_dir, max(sizes), rank=8, lora_alpha=16)
        setup_s = time.perf_counter() - start
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        expert_dirs = {f"expert-{i:05d}": run_dir / "experts" / f"expert-{i:05d}" for i in range(max(sizes))}

        def wrapped_engine(concurrency: int, n_experts: int):
            def make() -> Engine:
                model = AutoModelForCausalLM.from_pretrained(base_dir)
                chosen = dict(list(expert_dirs.items())[:n_experts])
                return Engine.from_model(model, tokenizer, chosen, engine_config(concurrency, args.cpu_adapters))
            return make

        def plain_engine(concurrency: int):
            return lambda: Engine(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer,
                                  engine_config(concurrency, args.cpu_adapters))

        probe = plain_engine(1)()
        results: dict = {"generation": {}}
        for concurrency in (1, 16):
            n_timed = args.requests if concurrency == 1 else args.requests16
            texts = prompts(probe, 2 * n_timed, seed=concurrency)
            timed, warm = texts[:n_timed], texts[n_timed:]
            configs: dict[str, tuple] = {
                "base_unwrapped": (plain_engine(concurrency), [(p, None) for p in timed], [(p, None) for p in warm]),
                "base": (wrapped_engine(concurrency, max(sizes)), [(p, None) for p in timed],
                         [(p, None) for p in warm]),
            }
            for n in sizes:
                for kind in ("uniform", "zipf"):
                    warm_experts = popularity(n, max(len(warm), min(n, args.cpu_adapters)), kind, args.zipf_s, 1)
                    warm_work = [(warm[i % len(warm)], e) for i, e in enumerate(warm_experts)]
                    work = list(zip(timed, popularity(n, n_timed, kind, args.zipf_s, 2), strict=True))
                    configs[f"routed_{n}_{kind}"] = (wrapped_engine(concurrency, n), work, warm_work)
            block = measure_interleaved(configs, concurrency, args.max_tokens, args.rounds)
            base = block["base_unwrapped"]["tokens_per_s"]
            block["ratio_vs_base_unwrapped"] = {name: round(v["tokens_per_s"] / base, 3) for name, v in block.items()}
            results["generation"][f"concurrency_{concurrency}"] = block
        probe.close()
        results["op_overhead_decode_16_rows"] = op_overhead()
        results["swap"] = swap_latency(run_dir, base_dir, args.swap_samples)
        results["swap"]["peft_load_adapter"] = peft_load_adapter(run_dir, base_dir, min(30, args.swap_samples))

    results["setup"] = {
        "model": "llama hidden 128, 4 layers, ffn 384, vocab 4096, fp32, random weights",
        "adapters": f"r=8, alpha=16, q/k/v/o/gate/up/down, {max(sizes)} experts written in {setup_s:.1f} s",
        "engine": f"max_batch=concurrency, slots=2x, cpu tier {args.cpu_adapters} adapters, torch threads 1, "
                  "merge_single_adapter on",
        "timing": f"{args.rounds} interleaved rounds per concurrency level after a cache-filling warm-up; tokens_per_s "
                  "is the median over rounds, tokens_per_s_mean the total over all rounds",
        "requests": f"prompts 16-48 tokens, {args.max_tokens} generated (greedy, ignore_eos), zipf s={args.zipf_s}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "torch": torch.__version__, "total_s": round(time.perf_counter() - began, 1),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
