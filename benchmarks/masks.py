"""Wall-clock speed of compacted mask experts beside the dense FFN they came from, on this CPU.

Prints one JSON object measured in one run: FFN latency and end-to-end greedy-decode tokens/s, dense vs compacted
masks at 25 / 50 / 75 % of the FFN neurons active per token, at batch 1 and batch 8, for two shapes:
- tiny: the embedded base's shape (hidden 128, FFN 384, 4 layers, vocab 4096);
- tinyllama: TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000).
Weights and masks are random (speed does not depend on what was learned, only on how many neurons are active and
how they are laid out). Each FFN gets E = 8 mask experts, top-1 routing by a random router: a shared block of
s·I neurons every token uses plus, per expert, a disjoint block of r·I routed neurons, with s + r = the active
ratio and r = min(ratio / 2, (1 − ratio) / (E − 1)) so that the eight routed blocks fit beside the shared one.

Configurations are timed round-robin (each one in turn, every round) and the median over rounds is reported, so
that load from other processes on a shared machine spreads over all of them. float32, torch.set_num_threads(2)
unless --threads says otherwise. On an oversubscribed machine (load average above the core count, recorded in the
output) two threads are much slower than one for every multi-threaded kernel, because a descheduled worker stalls
the other at each barrier; compare configurations only within one run.

End-to-end decode uses the first --decode-layers blocks of the TinyLlama shape (default 8 of 22, to keep the run
to a few minutes at two threads); fewer layers make the FFN a smaller share of the step (the embedding and the
32000-word head stay whole), so the speed-ups understate the full model's.

    python benchmarks/masks.py [--threads 2] [--rounds 5] [--decode-layers 8] [--decode-tokens 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from upcycle.masks.experiments.latency import decode_seconds_per_step, per_call, round_robin
from upcycle.masks.method.compact import CompactFFN
from upcycle.masks.method.router import TokenRouter
from upcycle.ops.flops import DecoderShape, decoder_flops
from upcycle.ops.sparse_ffn import SparseFFN

EXPERTS, TOP_K = 8, 1
RATIOS = (0.25, 0.5, 0.75)
BATCHES = (1, 8)
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=4096),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
}


def split(ratio: float, experts: int = EXPERTS) -> tuple[float, float]:
    """(shared fraction s, per-expert routed fraction r) with s + r = ratio and s + E·r <= 1."""
    routed = min(ratio / 2, (1 - ratio) / (experts - 1))
    return ratio - routed, routed


def random_masks(intermediate: int, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """shared [I] and routed [E, I] 0/1 masks at `ratio` active per token (see module docstring)."""
    shared_fraction, routed_fraction = split(ratio)
    n_shared, n_routed = round(shared_fraction * intermediate), round(routed_fraction * intermediate)
    perm = torch.randperm(intermediate, generator=generator)
    shared = torch.zeros(intermediate)
    shared[perm[:n_shared]] = 1.0
    routed = torch.zeros(EXPERTS, intermediate)
    for e in range(EXPERTS):
        routed[e, perm[n_shared + e * n_routed: n_shared + (e + 1) * n_routed]] = 1.0
    return shared, routed


def compact(mlp: torch.nn.Module, ratio: float, seed: int) -> CompactFFN:
    """A compact layer over `mlp`'s weights with random masks at `ratio` and a random top-1 router."""
    g = torch.Generator().manual_seed(seed)
    shared, routed = random_masks(mlp.gate_proj.out_features, ratio, g)
    ffn = SparseFFN.from_dense(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                               mlp.down_proj.weight.detach(), shared, routed)
    router = TokenRouter(mlp.gate_proj.in_features, EXPERTS, TOP_K)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=g) / mlp.gate_proj.in_features**0.5)
    return CompactFFN(router, ffn).eval()


def llama_mlp(shape: dict, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(**shape)).eval()


def half_width(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain SwiGLU over the first half of the neurons (contiguous copies): the ceiling for 50 % active."""
    half = mlp.gate_proj.out_features // 2
    w_gate, w_up = mlp.gate_proj.weight[:half].clone(), mlp.up_proj.weight[:half].clone()
    w_down = mlp.down_proj.weight[:, :half].clone()
    return lambda x: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


@torch.no_grad()
def bench_ffn(shape: dict, rounds: int) -> dict:
    """One FFN layer, decode-shaped input [B, 1, D]: dense vs compact at each ratio, and the half-width ceiling."""
    mlp = llama_mlp(shape, seed=0)
    layers = {ratio: compact(mlp, ratio, seed=1) for ratio in RATIOS}
    out = {}
    budget = 0.02 if shape["hidden_size"] < 1024 else 0.15
    for batch in BATCHES:
        x = torch.randn(batch, 1, shape["hidden_size"], generator=torch.Generator().manual_seed(2))
        fns = {"dense": partial(mlp, x), "half_width": partial(half_width(mlp), x)}
        fns |= {str(ratio): partial(layer, x) for ratio, layer in layers.items()}
        times = round_robin({name: per_call(fn, budget) for name, fn in fns.items()}, rounds)
        dense = times["dense"]
        row = {"dense_ms": 1e3 * dense, "half_width_speedup": dense / times["half_width"]}
        for ratio, layer in layers.items():
            chosen = layer.router.choose(x.view(batch, -1))  # [B, 1]
            active = float(layer.ffn.active_neurons(chosen).double().mean())
            row[str(ratio)] = {"ms": 1e3 * times[str(ratio)], "speedup": dense / times[str(ratio)],
                               "active_ratio_per_token": active / shape["intermediate_size"],
                               "distinct_experts_used": int(chosen.unique().numel())}
        out[f"batch{batch}"] = row
    return out


def random_decoder(shape: dict, layers: int):
    """A Llama of `shape` with `layers` blocks and uniform random weights (fast to build, no denormals)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = LlamaConfig(**(shape | {"num_hidden_layers": layers}), max_position_embeddings=512,
                         tie_word_embeddings=False)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                bound = (3.0 / param.shape[-1]) ** 0.5  # unit-variance outputs for unit-variance inputs
                param.uniform_(-bound, bound, generator=g)
    return model.eval()


@torch.no_grad()
def bench_decode(shape: dict, layers: int, steps: int, rounds: int, prompt: int = 8) -> dict:
    """End-to-end decode tokens/s: the same model with dense MLPs and with compact layers at each ratio."""
    model = random_decoder(shape, layers)
    blocks = model.model.layers
    dense = [block.mlp for block in blocks]
    variants = {"dense": dense}
    for i, ratio in enumerate(RATIOS):
        variants[str(ratio)] = [compact(mlp, ratio, seed=100 * i + j) for j, mlp in enumerate(dense)]
    out = {"layers": layers, "prompt_tokens": prompt}
    decoder = DecoderShape.from_config(model.config)
    ids = torch.randint(0, model.config.vocab_size, (max(BATCHES), prompt + steps),
                        generator=torch.Generator().manual_seed(3))  # teacher-forced random tokens
    for batch in BATCHES:
        batch_steps = steps if batch == 1 else max(2, steps // 2)  # a batch-8 step costs several batch-1 steps
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, mlps in variants.items():
                for block, mlp in zip(blocks, mlps, strict=True):
                    block.mlp = mlp
                samples[name].append(decode_seconds_per_step(model, ids[:batch, :prompt + batch_steps], prompt))
        seconds = {name: statistics.median(v) for name, v in samples.items()}
        dense_flops = decoder_flops(decoder, batch, 1, past=prompt)["total"]
        row = {"decode_steps": batch_steps, "dense_tokens_per_s": batch / seconds["dense"]}
        for ratio in RATIOS:
            active = round(sum(split(ratio)) * shape["intermediate_size"]) * batch
            sparse_flops = decoder_flops(decoder, batch, 1, past=prompt, ffn_neurons=[active] * layers,
                                         router_experts=EXPERTS)["total"]
            row[str(ratio)] = {"tokens_per_s": batch / seconds[str(ratio)],
                               "speedup": seconds["dense"] / seconds[str(ratio)],
                               "flops_ratio_vs_dense": sparse_flops / dense_flops}
        out[f"batch{batch}"] = row
    for block, mlp in zip(blocks, dense, strict=True):
        block.mlp = mlp
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds for the FFN timings")
    parser.add_argument("--decode-rounds", type=int, default=3, help="round-robin rounds for the decode timings")
    parser.add_argument("--decode-layers", type=int, default=8, help="TinyLlama-shape blocks used for decode")
    parser.add_argument("--decode-tokens", type=int, default=4, help="batch-1 decode steps per measurement (half "
                        "as many at batch 8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    result = {
        "benchmark": "masks", "device": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "dtype": "float32", "experts": EXPERTS, "top_k": TOP_K,
        "statistic": "median over round-robin rounds", "load_average_at_start": os.getloadavg(), "sizes": {},
    }
    for name, shape in SHAPES.items():
        layers = shape["num_hidden_layers"] if name == "tiny" else args.decode_layers
        result["sizes"][name] = {"shape": shape, "ffn": bench_ffn(shape, args.rounds),
                                 "decode": bench_decode(shape, layers, args.decode_tokens, args.decode_rounds)}
    result["load_average_at_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
