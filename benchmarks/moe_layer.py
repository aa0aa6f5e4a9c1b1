"""Forward + backward throughput of our MoE layer beside transformers' Mixtral block and a FLOP-equal dense MLP.

Prints one JSON object. Every configuration runs on the same input and the same weights; configurations are timed
round-robin (one step each per round) so that load from other processes on a shared machine spreads over all of them
instead of biasing whichever ran during a busy spell. Both the median and the best step are reported: on a loaded
machine the noise is preemption, which only adds time, so the best step is the better estimate of the cost itself.
The process CPU time of each step is reported beside the wall time: it leaves out the time the process waited for
a core, so its ratios move much less with the machine's load (with 2 threads it includes OpenMP's spin-waits).
The statistics overhead is timed directly (routing_stats + reading it back, on the layer's own routing) relative to
one forward + backward of the layer, because an on/off difference of a few percent drowns in that noise.

    python benchmarks/moe_layer.py [--rounds 4] [--tokens 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from upcycle.moe.config import MoEConfig
from upcycle.moe.layer import MoELayer, build_moe_layer
from upcycle.moe.stats import routing_stats

EXPERTS, TOP_K, DIM, FFN = 8, 2, 512, 1024


def our_layer(router: str, dispatch: str, backend: str = "auto", collect_stats: bool = True) -> MoELayer:
    torch.manual_seed(0)  # same router and expert weights for every configuration
    config = MoEConfig(num_experts=EXPERTS, router=router, dispatch=dispatch, grouped_backend=backend)
    return build_moe_layer(config, DIM, FFN, collect_stats=collect_stats).train()


def mixtral_block(source: MoELayer, implementation: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock holding `source`'s weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=DIM, intermediate_size=FFN, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(source.router.weight)
        block.experts.gate_up_proj.copy_(source.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(source.experts.w_out.transpose(1, 2))
    return block.train()


def dense_mlp() -> nn.Module:
    """A Llama SwiGLU MLP of width 2 * FFN: the same FLOPs per token as top-2 of E experts of width FFN."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=DIM, intermediate_size=TOP_K * FFN)).train()


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True)
        module(inp).backward(grad)

    return step


def stats_cost(layer: MoELayer, x: torch.Tensor, repeats: int) -> float:
    """Seconds per call of the statistics alone (routing_stats + reading them back), on this layer's routing."""
    with torch.no_grad():
        flat = x.reshape(-1, DIM)
        routing = layer.router(flat)
        dispatched = layer.dispatcher(flat, routing, layer.experts)
    start = time.perf_counter()
    for _ in range(repeats):
        routing_stats(routing, dispatched).to_dict()
    return (time.perf_counter() - start) / repeats


def _ratios(seconds: dict[str, float]) -> dict[str, float | str]:
    """Throughput ratios (> 1: ours is faster) from per-step seconds."""
    hf_best = min((n for n in seconds if n.startswith("hf_mixtral/")), key=seconds.get)
    ours = seconds["ours/gshard/dropless"]
    return {
        "fastest_hf": hf_best,
        "ours_top2_dropless / fastest_hf": round(seconds[hf_best] / ours, 3),
        "ours_top2_dropless / dense_flop_equal": round(seconds["dense_swiglu_2F"] / ours, 3),
        "ours_top2_capacity / dense_flop_equal": round(seconds["dense_swiglu_2F"] / seconds["ours/gshard/capacity"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(4, args.tokens // 4, DIM)
    grad = torch.randn_like(x)
    load_before = os.getloadavg()[0]

    gshard = our_layer("gshard", "dropless")
    modules: dict[str, nn.Module] = {}
    for router in ("switch", "gshard", "st_moe", "expert_choice"):
        for dispatch in ("capacity", "dropless"):
            modules[f"ours/{router}/{dispatch}"] = our_layer(router, dispatch)
    for backend in ("grouped_mm", "loop"):  # the default "auto" is padded_bmm on a CPU
        modules[f"ours/gshard/dropless/{backend}"] = our_layer("gshard", "dropless", backend)
    skipped = {"hf_mixtral/batched_mm": "gathers one [2F, D] weight per token-expert pair: "
                                        f"{args.tokens * TOP_K * 2 * FFN * DIM * 4 / 2**30:.0f} GiB at this size"}
    for implementation in ("eager", "grouped_mm"):
        modules[f"hf_mixtral/{implementation}"] = mixtral_block(gshard, implementation)
    modules["dense_swiglu_2F"] = dense_mlp()

    steps = {name: step_fn(module, x, grad) for name, module in modules.items()}
    for step in steps.values():  # warm-up: allocator, MKL packing, lazy init
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)

    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    stats_seconds = stats_cost(gshard, x, repeats=20)
    result = {
        "setup": {"experts": EXPERTS, "top_k": TOP_K, "hidden": DIM, "expert_ffn": FFN, "tokens": args.tokens,
                  "dense_ffn": TOP_K * FFN, "threads": args.threads, "rounds": args.rounds, "dtype": "float32",
                  "torch": torch.__version__, "capacity_factor_train": MoEConfig().capacity_factor,
                  "ours_dropless_backend": "auto = padded_bmm on CPU (rows gathered straight into [E, C, D])"},
        "tokens_per_s_median": {name: round(args.tokens / seconds) for name, seconds in median.items()},
        "tokens_per_s_best": {name: round(args.tokens / seconds) for name, seconds in best.items()},
        "spread": {name: round((max(v) - min(v)) / statistics.median(v), 3) for name, v in times.items()},
        "skipped": skipped,
        "ratios_median": _ratios(median),
        "ratios_best": _ratios(best),
        "ratios_cpu_time_median": _ratios({name: statistics.median(v) for name, v in cpu_times.items()}),
        "stats_overhead": round(stats_seconds / best["ours/gshard/dropless"], 4),
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
