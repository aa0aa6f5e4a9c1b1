"""Wall-clock cost of models measured side by side in one process: round-robin rounds, median per configuration.

On a shared machine another process's load comes and goes; timing every configuration in turn, each round, and
taking the median over rounds spreads that load over all of them, so ratios between configurations measured in
the same call are meaningful even when absolute times are not. Compare numbers only within one call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def per_call(fn: Callable[[], object], min_seconds: float) -> Callable[[], float]:
    """A measurement: calls `fn` at least once and until `min_seconds` have passed; returns seconds per call."""
    def measure() -> float:
        start, calls = time.perf_counter(), 0
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return elapsed / calls
    return measure


def round_robin(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median over `rounds` of each measurement (a callable returning seconds); each round runs every one in turn."""
    for measure in measures.values():  # warm-up: allocator, thread pools, cached views
        measure()
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def decode_seconds_per_step(model: nn.Module, ids: torch.Tensor, prompt: int) -> float:
    """Seconds per decode step over ids [B, prompt + steps]: prefill `prompt` tokens (not timed), then feed the rest
    one position at a time through the KV cache (teacher-forced; a greedy choice costs the same)."""
    out = model(input_ids=ids[:, :prompt], use_cache=True, logits_to_keep=1)
    start = time.perf_counter()
    for t in range(prompt, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
    return (time.perf_counter() - start) / (ids.shape[1] - prompt)


def measure_latency(models: dict[str, nn.Module], blocks: torch.Tensor, rounds: int = 7, prompt: int = 32,
                    decode_steps: int = 32, prefill_batch: int = 8) -> dict[str, dict[str, float]]:
    """Per model: batch-1 decode ms per token and prefill ms for [prefill_batch, L] blocks, measured interleaved.

    blocks [N, L] token ids (real text, so that routers and thresholds see realistic inputs); blocks shorter than
    prompt + decode_steps split L between the two.
    """
    if blocks.shape[1] < prompt + decode_steps:
        prompt = max(1, blocks.shape[1] // 2)
        decode_steps = blocks.shape[1] - prompt
    ids = blocks[:1, :prompt + decode_steps]
    batch = blocks[:prefill_batch]
    measures = {}
    for name, model in models.items():
        model.eval()
        measures[f"{name}/decode"] = lambda model=model: decode_seconds_per_step(model, ids, prompt)
        measures[f"{name}/prefill"] = per_call(
            lambda model=model: _prefill(model, batch), min_seconds=0.05)
    times = round_robin(measures, rounds)
    return {name: {"decode_ms_per_token": 1e3 * times[f"{name}/decode"], "prefill_ms": 1e3 * times[f"{name}/prefill"],
                   "prefill_tokens": int(batch.numel()), "prompt_tokens": prompt, "decode_steps": decode_steps}
            for name in models}


@torch.no_grad()
def _prefill(model: nn.Module, batch: torch.Tensor) -> None:
    model(input_ids=batch, logits_to_keep=1)
