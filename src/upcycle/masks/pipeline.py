"""The mask experts' end-to-end steps behind the CLI: train (and evaluate, analyse, compact, export), analyse a run
again, and sweep targets into a quality / active-ratio Pareto curve.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from upcycle.data import SplitConfig
from upcycle.eval.perplexity import token_nll
from upcycle.io import ensure_writable_dir, write_json
from upcycle.masks.analysis import MaskAnalysis, analyze_masks
from upcycle.masks.compact import compact_model
from upcycle.masks.data import mask_blocks
from upcycle.masks.export import save_compact
from upcycle.masks.run import ANALYSIS, COMPACT, WORK, apply_masks, base_identity, read_meta, save_masks, write_meta
from upcycle.masks.train import MaskTrainConfig, train_masks
from upcycle.ops.flops import DecoderShape, decoder_flops

log = logging.getLogger(__name__)


def held_out_loss(model: nn.Module, blocks: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Mean next-token loss (nats) over held-out blocks, model in eval mode."""
    model.eval()
    total, count = token_nll(model, *blocks, batch_size=8)
    return total / max(count, 1)


def flops_summary(model: nn.Module, analysis: MaskAnalysis, tokens: int) -> dict:
    """Whole-model and FFN FLOPs of a `tokens`-long forward at the analysed active ratios, relative to dense."""
    shape = DecoderShape.from_config(model.config)
    neurons = [round(r.active_ratio * r.intermediate * tokens) for r in analysis.layers]
    experts = [len(r.expert_kinds) for r in analysis.layers]
    dense = decoder_flops(shape, 1, tokens)
    sparse = decoder_flops(shape, 1, tokens, ffn_neurons=neurons, router_experts=experts)
    return {"tokens": tokens, "dense_total": dense["total"], "masked_total": sparse["total"],
            "total_ratio": sparse["total"] / dense["total"],
            "ffn_ratio": (sparse["ffn"] + sparse["router"]) / dense["ffn"]}


@torch.no_grad()
def compact_and_check(model: nn.Module, analysis: MaskAnalysis, blocks: torch.Tensor) -> float:
    """Compact `model` in place using `analysis`; returns the largest |logit| difference on `blocks` (same tokens
    the analysis saw, where the analysis-driven compaction must be exact)."""
    model.eval()
    before = [model(input_ids=blocks[i:i + 4]).logits for i in range(0, blocks.shape[0], 4)]
    compact_model(model, analysis)
    after = [model(input_ids=blocks[i:i + 4]).logits for i in range(0, blocks.shape[0], 4)]
    return max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))


def train_run(base: str, config: MaskTrainConfig, out: str | Path, data: str = "stdlib",
              splits: SplitConfig = SplitConfig(), eval_blocks: int = 32, compact: bool = True) -> dict:
    """Train masks on `base`, evaluate, analyse, compact and export into run directory `out`. Returns masks.json."""
    from upcycle.models.base import load_base, resolve_base

    out = ensure_writable_dir(out)
    base = resolve_base(base)
    model, tokenizer = load_base(base)
    identity = base_identity(base, model)  # before surgery: refuses models without a SwiGLU FFN below
    train_tokens = config.train.steps * config.train.batch_size * config.block_size
    train_blocks, val_blocks = mask_blocks(tokenizer, data, splits, config.block_size, train_tokens, eval_blocks,
                                           seed=config.train.seed)
    dense_loss = held_out_loss(model, val_blocks)

    result, lagrangian = train_masks(model, train_blocks, config, checkpoint_dir=ensure_writable_dir(out / WORK))
    masked_loss = held_out_loss(model, val_blocks)
    analysis = analyze_masks(model, *val_blocks)
    history = result.history[:: max(1, len(result.history) // 200)]
    meta = {
        "command": " ".join(sys.argv),
        "base": identity,
        "data": data,
        "splits": asdict(splits),
        "masks": asdict(config.masks),
        "config": asdict(config),
        "training": {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                     "final": result.history[-1], "lagrangian": lagrangian.state_dict(), "curve": history},
        "evaluation": {
            "held_out_blocks": int(val_blocks[0].shape[0]), "held_out_tokens": analysis.tokens,
            "dense_loss": dense_loss, "dense_perplexity": math.exp(dense_loss),
            "masked_loss": masked_loss, "masked_perplexity": math.exp(masked_loss),
            "target": config.target, "achieved_active_ratio": analysis.active_ratio,
            "experts": analysis.expert_counts(), "flops": flops_summary(model, analysis, config.block_size),
        },
    }
    save_masks(out, model, meta)
    write_json(out / ANALYSIS, analysis.to_dict())
    if compact:
        gap = compact_and_check(model, analysis, val_blocks[0][:8])
        save_compact(model, out / COMPACT, tokenizer, extra={"masks_run": str(out), "target": config.target})
        meta["compact"] = {"path": str(out / COMPACT), "max_abs_logit_difference": gap}
        write_meta(out, meta)
    log.info("%s: active %.3f (target %.3f), held-out perplexity %.2f (dense %.2f)", out, analysis.active_ratio,
             config.target, math.exp(masked_loss), math.exp(dense_loss))
    return meta


def analyze_run(run: str | Path, base: str | None = None, eval_blocks: int = 32) -> dict:
    """Re-analyse a run's masks on held-out blocks of its data (on `base`, default the one it was trained on)."""
    from upcycle.models.base import load_base, resolve_base

    meta = read_meta(run)
    base = resolve_base(base or meta["base"]["path"])
    model, tokenizer = load_base(base)
    apply_masks(run, model, base)
    config = meta["config"]
    _, val_blocks = mask_blocks(tokenizer, meta["data"], SplitConfig(**meta["splits"]), config["block_size"], 1,
                                eval_blocks)
    analysis = analyze_masks(model, *val_blocks)
    summary = analysis.to_dict()
    summary["held_out_loss"] = held_out_loss(model, val_blocks)
    write_json(Path(run) / ANALYSIS, summary)
    return summary


def sweep_runs(base: str, targets: list[float], config: MaskTrainConfig, out: str | Path, data: str = "stdlib",
               splits: SplitConfig = SplitConfig(), eval_blocks: int = 32) -> dict:
    """One mask run per target under `out`; sweep.json and pareto.png compare held-out perplexity with the
    achieved active ratio."""
    from dataclasses import replace

    out = ensure_writable_dir(out)
    points = []
    for target in targets:
        run = out / f"target-{target:g}"
        meta = train_run(base, replace(config, target=target), run, data, splits, eval_blocks, compact=False)
        ev = meta["evaluation"]
        points.append({"target": target, "run": str(run), "achieved_active_ratio": ev["achieved_active_ratio"],
                       "perplexity": ev["masked_perplexity"], "dense_perplexity": ev["dense_perplexity"],
                       "flops_ratio": ev["flops"]["total_ratio"]})
    summary = {"base": base, "targets": targets, "points": points}
    write_json(out / "sweep.json", summary)
    plot_pareto(points, out / "pareto.png")
    return summary


def plot_pareto(points: list[dict], path: Path) -> None:
    """Held-out perplexity against the achieved active ratio, the dense model as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [p["achieved_active_ratio"] for p in points]
    ax.plot(xs, [p["perplexity"] for p in points], "o-", label="mask experts")
    ax.axhline(points[0]["dense_perplexity"], color="grey", linestyle="--", label="dense")
    for p in points:
        ax.annotate(f"t={p['target']:g}", (p["achieved_active_ratio"], p["perplexity"]), fontsize=8)
    ax.set_xlabel("FFN neurons active per token")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
