"""The mask experts against their baselines at equal active FFN fractions: quality, sparsity per layer, latency.

For each target active ratio t and each method, the model as it would be served:
- masks        learned mask experts (`end_to_end.train_run`, one run directory each), compacted;
- moefication  neurons clustered into E experts, a router fitted per layer, top round(t·E) experts per token;
- pruning      the t fraction of neurons with the largest weight norms kept, FFN weights fine-tuned;
- teal         activations below calibrated magnitude thresholds zeroed, training-free.
Masks, MoEfication and pruning train on the same number of training tokens (steps × batch × block of the mask
run; MoEfication's routers fit to the FFN inputs of that many training tokens); TEAL calibrates on training tokens.

Every model is scored on the held-out splits, its achieved active fraction is measured per layer on the quality
split (the FFN weight rows read per token, relative to the dense FFN), and all models' latencies are measured
side by side in one process (`latency`). The sweep writes OUT/sweep.json, OUT/report.md (tables) and
OUT/pareto.png (quality against active fraction and against measured latency).

Legend: T tokens, D model dim, I intermediate neurons, E experts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from upcycle.data import SplitConfig
from upcycle.data.blocks import corpus_blocks
from upcycle.data.packing import IGNORE_INDEX
from upcycle.errors import UserError
from upcycle.io import atomic_write_text, ensure_writable_dir, write_json
from upcycle.masks.config import BaselineSettings, MaskTrainConfig
from upcycle.masks.experiments.end_to_end import HELD_OUT, held_out_perplexities, train_run
from upcycle.masks.experiments.run_dir import COMPACT
from upcycle.masks.method.compact import CompactFFN
from upcycle.models.surgery import find_ffns, is_swiglu_ffn
from upcycle.ops.flops import DecoderShape, decoder_flops
from upcycle.training.config import TrainConfig

log = logging.getLogger(__name__)

METHODS = ("masks", "moefication", "pruning", "teal")


@dataclass
class SweepContext:
    """What every method's builder needs."""

    base: str
    dense: nn.Module
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: MaskTrainConfig
    baselines: BaselineSettings
    out: Path
    data: str
    splits: SplitConfig
    eval_blocks: int

    @property
    def train_tokens(self) -> int:
        return self.config.train.steps * self.config.train.batch_size * self.config.block_size


def build_masks(ctx: SweepContext, target: float) -> tuple[nn.Module, dict]:
    """Train masks for `target` (a full run directory under OUT) and load its compacted model."""
    from upcycle.masks.method.export import load_compact

    run = ctx.out / f"masks-{target:g}"
    meta = train_run(ctx.base, replace(ctx.config, target=target), run, ctx.data, ctx.splits, ctx.eval_blocks)
    ev = meta["evaluation"]
    if "skipped" in meta["compact"]:
        raise UserError(f"{run}: the sweep times the compact model, but {meta['compact']['skipped']}")
    return load_compact(run / COMPACT), {"run": str(run), "training_tokens": meta["training"]["tokens"],
                                         "experts": ev["experts"], "masked_model_validation_perplexity":
                                         ev["masked_perplexity"]}


def build_moefication(ctx: SweepContext, target: float) -> tuple[nn.Module, dict]:
    """Cluster neurons, fit routers on the FFN inputs of as many training tokens as the mask run trains on."""
    from upcycle.masks.baselines.moefication import MoEficationConfig, moefy

    experts = ctx.baselines.moefication_experts
    top_k = min(experts, max(1, round(target * experts)))
    train = ctx.config.train
    inputs = ctx.blocks["train"][0][: train.steps * train.batch_size]
    router = TrainConfig(steps=train.steps, batch_size=1024, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1,
                         grad_clip=0.0, seed=train.seed)
    model = copy.deepcopy(ctx.dense)
    stats = moefy(model, inputs, MoEficationConfig(experts=experts, top_k=top_k, calibration_tokens=inputs.numel(),
                                                   router=router, seed=train.seed))
    recall = sum(s["router_recall"] for s in stats.values()) / len(stats)
    return model, {"experts": experts, "top_k": top_k, "training_tokens": int(inputs.numel()),
                   "mean_router_recall": recall}


def build_pruning(ctx: SweepContext, target: float) -> tuple[nn.Module, dict]:
    """Keep the `target` fraction of neurons per FFN by weight norms; fine-tune the FFNs like the mask run trains."""
    from upcycle.masks.baselines.pruning import finetune_pruned, prune_ffns

    model = copy.deepcopy(ctx.dense)
    kept = prune_ffns(model, target)
    train = ctx.config.train
    config = TrainConfig(steps=train.steps, batch_size=train.batch_size, lr=ctx.baselines.pruning_lr,
                         warmup_steps=train.warmup_steps, min_lr_ratio=0.1, seed=train.seed)
    result = finetune_pruned(model, ctx.blocks["train"], config)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval(), {"kept_neurons": kept, "training_tokens": result.tokens, "lr": config.lr}


def build_teal(ctx: SweepContext, target: float) -> tuple[nn.Module, dict]:
    """Calibrate per-layer magnitude thresholds keeping `target` of the FFN inputs and activations (no training)."""
    from upcycle.masks.baselines.teal import sparsify_activations

    model = copy.deepcopy(ctx.dense)
    inputs = ctx.blocks["train"][0]
    blocks = max(1, math.ceil(ctx.baselines.calibration_tokens / inputs.shape[1]))
    sparsify_activations(model, inputs[:blocks], keep=target, seed=ctx.config.train.seed)
    return model, {"training_tokens": 0, "calibration_tokens": int(inputs[:blocks].numel())}


BUILDERS: dict[str, Callable[[SweepContext, float], tuple[nn.Module, dict]]] = {
    "masks": build_masks, "moefication": build_moefication, "pruning": build_pruning, "teal": build_teal}


@torch.no_grad()
def layer_active_fractions(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, intermediate: int,
                           batch_size: int = 8) -> list[float]:
    """Per FFN layer, the mean fraction of the dense FFN's weight rows read per token over blocks [N, L].

    Compact mask / MoEfication layers: neurons computed; TEAL layers: see `ThresholdFFN.active_fraction`; a plain
    SwiGLU FFN (dense or pruned): its width over `intermediate`. Blocks with padding are skipped.
    """
    layers = [(name, m) for name, m in model.named_modules() if _is_ffn(m)]
    sums = [0.0] * len(layers)
    full = (labels != IGNORE_INDEX).all(dim=1)
    inputs = inputs[full] if full.any() else inputs
    batches = 0

    def hook(i):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            if _is_sparse_ffn(module):
                sums[i] += module.active_fraction(x)
            else:
                sums[i] += module.gate_proj.out_features / intermediate
        return record

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    try:
        for start in range(0, inputs.shape[0], batch_size):
            model(input_ids=inputs[start:start + batch_size])
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
    return [s / batches for s in sums]


def _is_ffn(module: nn.Module) -> bool:
    return _is_sparse_ffn(module) or is_swiglu_ffn(module)


def _is_sparse_ffn(module: nn.Module) -> bool:
    """A layer that reports its own active fraction (a TEAL layer also looks like a plain SwiGLU FFN)."""
    from upcycle.masks.baselines.teal import ThresholdFFN

    return isinstance(module, (CompactFFN, ThresholdFFN))


def sweep_runs(base: str, targets: list[float], config: MaskTrainConfig, out: str | Path, data: str = "stdlib",
               splits: SplitConfig = SplitConfig(), eval_blocks: int = 32, methods: tuple[str, ...] = METHODS,
               baselines: BaselineSettings = BaselineSettings(), latency_rounds: int = 9,
               latency_threads: int = 1) -> dict:
    """Every method at every target; writes OUT/sweep.json, OUT/report.md and OUT/pareto.png. Returns sweep.json."""
    from upcycle.models.base import load_base, resolve_base

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    started = time.perf_counter()
    out = ensure_writable_dir(out)
    base = resolve_base(base)
    dense, tokenizer = load_base(base)
    dense.eval()
    find_ffns(dense)  # a model without SwiGLU FFNs is refused before anything trains
    shape = DecoderShape.from_config(dense.config)
    ctx = SweepContext(base, dense, {}, config, baselines, out, data, splits, eval_blocks)
    ctx.blocks = corpus_blocks(tokenizer, data, splits, config.block_size, **HELD_OUT, train_tokens=ctx.train_tokens,
                               eval_blocks=eval_blocks, seed=config.train.seed)
    quality = "test" if "test" in ctx.blocks else "validation"
    models, points = {"dense": dense}, [_point("dense", 1.0, dense, ctx, quality, shape, {})]
    for target in targets:
        for method in methods:
            log.info("sweep: %s at target %g", method, target)
            model, info = BUILDERS[method](ctx, target)
            points.append(_point(method, target, model, ctx, quality, shape, info))
            models[_key(method, target)] = model
    latency = measure_models(models, ctx.blocks[quality][0], latency_rounds, latency_threads)
    dense_latency = latency["dense"]
    for point in points:
        measured = latency[_key(point["method"], point["target"])]
        point["latency"], point["dense_latency"] = measured, dense_latency
        point["decode_speedup"] = dense_latency["decode_ms_per_token"] / measured["decode_ms_per_token"]
        point["prefill_speedup"] = dense_latency["prefill_ms"] / measured["prefill_ms"]
    summary = {
        "command": " ".join(sys.argv), "base": base, "data": data, "splits": asdict(splits), "targets": targets,
        "methods": list(methods), "quality_split": quality, "config": asdict(config), "baselines": asdict(baselines),
        "training_tokens_per_run": ctx.train_tokens, "torch_threads": latency_threads,
        "load_average_at_end": os.getloadavg(), "seconds": time.perf_counter() - started, "points": points,
    }
    write_sweep(summary, out)
    return summary


def write_sweep(summary: dict, out: Path) -> None:
    """OUT/sweep.json, OUT/pareto.png and OUT/report.md of a sweep summary."""
    from upcycle.masks.experiments.sweep_report import plot_pareto, sweep_report

    write_json(out / "sweep.json", summary)
    plot_pareto(summary["points"], summary["quality_split"], out / "pareto.png")
    atomic_write_text(out / "report.md", sweep_report(summary))


def merge_sweeps(summaries: list[dict]) -> dict:
    """One summary from sweeps of the same base and settings run separately (e.g. one process per target).

    Speed-ups stay relative to the dense model timed in each sweep's own rounds; the first sweep's dense point is
    kept. Refuses sweeps whose settings or held-out split differ.
    """
    def settings(summary: dict) -> dict:  # the mask config's own target is the sweep's first target: not a setting
        config = {k: v for k, v in summary["config"].items() if k != "target"}
        return {key: summary[key] for key in ("base", "data", "splits", "baselines", "quality_split")} | {
            "config": config}

    first = summaries[0]
    for other in summaries[1:]:
        for key, value in settings(other).items():
            if value != settings(first)[key]:
                raise UserError(f"cannot merge sweeps with different {key}")
    points = [p for p in first["points"] if p["method"] == "dense"]
    for summary in summaries:  # each point keeps the dense timing it was compared with
        dense = next(p for p in summary["points"] if p["method"] == "dense")
        points += [{"dense_latency": dense["latency"], **p} for p in summary["points"] if p["method"] != "dense"]
    return {**first, "command": "; ".join(s["command"] for s in summaries),
            "targets": [t for s in summaries for t in s["targets"]], "seconds": max(s["seconds"] for s in summaries),
            "merged_from": len(summaries), "points": points}


def _key(method: str, target: float) -> str:
    return "dense" if method == "dense" else f"{method}@{target:g}"


def _point(method: str, target: float, model: nn.Module, ctx: SweepContext, quality: str, shape: DecoderShape,
           info: dict) -> dict:
    """Quality, per-layer active fractions and whole-model FLOPs of one served model."""
    perplexity = held_out_perplexities(model, ctx.blocks)
    layers = layer_active_fractions(model, *ctx.blocks[quality], shape.intermediate)
    tokens = ctx.config.block_size
    flops = decoder_flops(shape, 1, tokens, ffn_neurons=[round(r * shape.intermediate * tokens) for r in layers])
    return {"method": method, "target": target, "achieved_active_ratio": sum(layers) / len(layers),
            "layer_active_ratios": layers, "perplexity": perplexity[quality], "perplexities": perplexity,
            "flops_ratio": flops["total"] / decoder_flops(shape, 1, tokens)["total"], **info}


def measure_models(models: dict[str, nn.Module], blocks: torch.Tensor, rounds: int,
                   threads: int) -> dict[str, dict[str, float]]:
    """Latency of every model, side by side with `threads` torch threads (see `upcycle.masks.experiments.latency`)."""
    from upcycle.masks.experiments.latency import measure_latency

    log.info("sweep: timing %d models, %d interleaved rounds, %d thread(s)", len(models), rounds, threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_latency(models, blocks, rounds=rounds)
    finally:
        torch.set_num_threads(before)
