"""One mask run end to end, behind `upcycle masks train | analyze`: train, evaluate, calibrate, analyse, compact and
export into a run directory (its layout: `run_dir`), and analyse a run again. The sweep against the baselines lives
in `sweep`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from upcycle.data import SplitConfig
from upcycle.data.blocks import corpus_blocks
from upcycle.errors import UserError
from upcycle.eval.perplexity import mean_loss, perplexity
from upcycle.io import atomic_write_text, ensure_writable_dir, write_json
from upcycle.masks.config import MaskTrainConfig
from upcycle.masks.experiments.run_dir import (
    ANALYSIS,
    ANALYSIS_TABLE,
    COMPACT,
    EXPERTS_PLOT,
    META,
    WORK,
    apply_masks,
    base_identity,
    read_meta,
    save_masks,
    write_meta,
)
from upcycle.masks.method.analysis import MaskAnalysis, analysis_table, analyze_masks, plot_experts
from upcycle.masks.method.calibrate import calibrate_gates
from upcycle.masks.method.compact import compact_model, packed_rows
from upcycle.masks.method.export import save_compact
from upcycle.masks.method.surgery import masked_ffns
from upcycle.masks.method.train import train_masks
from upcycle.models.surgery import find_ffns
from upcycle.ops.flops import DecoderShape, decoder_flops
from upcycle.training.loop import is_main_process

log = logging.getLogger(__name__)

SKIP_COMPACT_ABOVE = (8.0, 1 << 30)
"""The compact export is skipped when it would store more than this many times the dense FFNs' weight rows *and*
more than this many bytes: overlapping experts keep a copy of a shared neuron each (see `packed_rows`), which for
E = 128 on the tiny base is ~60x its FFNs (~130 MB, harmless) but would be hundreds of GB on a 1B model."""
HELD_OUT = {"names": ("train", "validation", "test"), "required": ("train", "validation")}
"""The splits a mask run reads (`upcycle.data.blocks.corpus_blocks`): settings are chosen on 'validation'; 'test'
(absent when the split is empty) is for the final numbers only."""


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


def held_out_perplexities(model: nn.Module, blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Perplexity on each held-out split in `blocks` ('validation', and 'test' when present), model in eval mode."""
    model.eval()
    return {split: perplexity(model, *blocks[split], batch_size=8)
            for split in ("validation", "test") if split in blocks}


def train_run(base: str, config: MaskTrainConfig, out: str | Path, data: str = "stdlib",
              splits: SplitConfig = SplitConfig(), eval_blocks: int = 32, compact: bool = True) -> dict | None:
    """Train masks on `base`, evaluate, analyse, compact and export into run directory `out`. Returns masks.json
    (None on ranks other than 0 under DDP).

    Perplexities are reported on the validation split (where settings are chosen) and on the test split (final
    numbers only). The test-time gates are calibrated to the target on the validation blocks
    (`upcycle.masks.method.calibrate`), where the expert analysis and the achieved active ratios are measured too; the
    sweep measures the achieved ratios again on the test blocks.
    """
    from upcycle.models.base import load_base, resolve_base

    out = ensure_writable_dir(out)
    base = resolve_base(base)
    model, tokenizer = load_base(base)
    find_ffns(model)  # refuses a model without SwiGLU FFNs before any data is read
    identity = base_identity(base, model)  # before surgery
    train_tokens = config.train.steps * config.train.batch_size * config.block_size
    blocks = corpus_blocks(tokenizer, data, splits, config.block_size, **HELD_OUT, train_tokens=train_tokens,
                           eval_blocks=eval_blocks, seed=config.train.seed)
    val_blocks = blocks["validation"]
    dense = held_out_perplexities(model, blocks)

    result, lagrangian = train_masks(model, blocks["train"], config, checkpoint_dir=ensure_writable_dir(out / WORK))
    if not is_main_process():  # under DDP every rank holds the same masks; rank 0 evaluates and saves them
        return None
    # the test split checks that the calibration transfers; its analysis of the validation blocks is the run's
    calibration = calibrate_gates(model, val_blocks[0], config.target, val_blocks[1])
    analysis = calibration.analysis
    masked = held_out_perplexities(model, blocks)
    history = result.history[:: max(1, len(result.history) // 200)]
    meta = {
        "command": " ".join(sys.argv),
        "base": identity,
        "data": data,
        "splits": asdict(splits),
        "masks": asdict(config.masks),
        "config": asdict(config),
        "training": {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                     "final": result.history[-1], "lagrangian": lagrangian.state_dict(), "curve": history,
                     "gate_calibration": calibration.summary()},
        "evaluation": {
            "held_out_blocks": int(val_blocks[0].shape[0]), "held_out_tokens": analysis.tokens,
            "dense_perplexity": dense["validation"], "masked_perplexity": masked["validation"],
            "dense_test_perplexity": dense.get("test"), "masked_test_perplexity": masked.get("test"),
            "target": config.target, "achieved_active_ratio": analysis.active_ratio,
            "layer_active_ratios": {r.name: r.active_ratio for r in analysis.layers},
            "experts": analysis.expert_counts(), "flops": flops_summary(model, analysis, config.block_size),
        },
    }
    save_masks(out, model, meta)
    write_analysis(out, analysis, analysis.to_dict())
    if compact:
        meta["compact"] = compact_export(model, analysis, val_blocks[0][:8], tokenizer, out, config.target)
        write_meta(out, meta)
    log.info("%s: active %.3f (target %.3f), validation perplexity %.2f (dense %.2f)", out, analysis.active_ratio,
             config.target, masked["validation"], dense["validation"])
    return meta


def compact_export(model: nn.Module, analysis: MaskAnalysis, blocks: torch.Tensor, tokenizer, out: Path,
                   target: float) -> dict:
    """Compact `model` in place and save it to OUT/compact, unless that would be too large (`SKIP_COMPACT_ABOVE`).
    Returns masks.json's "compact" entry."""
    ratio, size = _export_size(model, analysis)
    if ratio > SKIP_COMPACT_ABOVE[0] and size > SKIP_COMPACT_ABOVE[1]:
        message = (f"compact export skipped: it would hold {ratio:.0f}x the dense FFNs' weights ({size / 2**30:.1f} "
                   "GiB), because every expert keeps its own copy of the neurons it shares with others; the masks "
                   "are saved and load onto the base (upcycle.masks.experiments.run_dir.apply_masks); train with "
                   "--recipe.masks.layout partition for a compact model")
        log.warning(message)
        return {"skipped": message, "packed_rows_ratio": ratio}
    return _write_compact(model, analysis, blocks, tokenizer, out / COMPACT, {"masks_run": str(out), "target": target},
                          ratio, size)


def _export_size(model: nn.Module, analysis: MaskAnalysis) -> tuple[float, int]:
    """(compact FFN rows / dense FFN rows, bytes of the compact FFN weights) of the masked `model`."""
    packed, dense_rows = packed_rows(model, analysis)
    weight = masked_ffns(model)[0][1].gate_proj.weight  # [I, D]
    return packed / dense_rows, packed * 3 * weight.shape[1] * weight.element_size()  # gate, up, down rows


def _write_compact(model: nn.Module, analysis: MaskAnalysis, blocks: torch.Tensor, tokenizer, out: Path,
                   extra: dict, ratio: float, size: int) -> dict:
    """Compact `model` in place, check it on `blocks`, save it to `out`; `ratio` and `size` are `_export_size`'s,
    which the caller has already used to decide."""
    gap = compact_and_check(model, analysis, blocks)
    save_compact(model, out, tokenizer, extra=extra)
    return {"path": str(out), "max_abs_logit_difference": gap, "packed_rows_ratio": ratio, "bytes": size}


EXPORT_CAP = 1.25
"""`masks export` refuses a compact model larger than this many times the dense FFNs' weights (--max_ratio)."""


def export_run(run: str | Path, out: str | Path | None = None, base: str | None = None, eval_blocks: int = 32,
               max_ratio: float = EXPORT_CAP) -> dict:
    """Compact a finished mask run's model and save it to `out` (default RUN/compact); returns masks.json's
    "compact" entry, which is also written into RUN/masks.json."""
    from upcycle.models.base import load_base, resolve_base

    run = Path(run)
    if not (run / META).exists() and (run / WORK).exists():
        raise UserError(f"{run} is still training or was interrupted: its training state is in {run / WORK} and "
                        f"it has no {META} yet; finish it with the same `upcycle masks train` command, then export")
    meta = read_meta(run)
    base = resolve_base(base or meta["base"]["path"])
    model, tokenizer = load_base(base)
    apply_masks(run, model, base)
    blocks = corpus_blocks(tokenizer, meta["data"], SplitConfig(**meta["splits"]), meta["config"]["block_size"],
                           **HELD_OUT, train_tokens=1, eval_blocks=eval_blocks)
    analysis = analyze_masks(model, *blocks["validation"])
    ratio, size = _export_size(model, analysis)
    if ratio > max_ratio:
        raise UserError(f"the compact model would store {ratio:.2f}x the dense FFNs' weights ({size / 2**20:.0f} "
                        f"MiB), above the cap of {max_ratio:g}x (--max_ratio): with the "
                        f"'{meta['masks'].get('layout', 'overlap')}' layout every expert keeps its own copy of the "
                        "neurons it shares with others; train with --recipe.masks.layout partition, which stores "
                        "each neuron once")
    entry = _write_compact(model, analysis, blocks["validation"][0][:8], tokenizer, Path(out or run / COMPACT),
                           {"masks_run": str(run), "target": meta["evaluation"]["target"]}, ratio, size)
    write_meta(run, meta | {"compact": entry})
    return entry


def analyze_run(run: str | Path, base: str | None = None, eval_blocks: int = 32) -> dict:
    """Re-analyse a run's masks on held-out blocks of its data (on `base`, default the one it was trained on).

    Rewrites RUN/analysis.json and draws RUN/experts.png (expert kinds and active ratio per layer).
    """
    from upcycle.models.base import load_base, resolve_base

    meta = read_meta(run)
    base = resolve_base(base or meta["base"]["path"])
    model, tokenizer = load_base(base)
    apply_masks(run, model, base)
    config = meta["config"]
    blocks = corpus_blocks(tokenizer, meta["data"], SplitConfig(**meta["splits"]), config["block_size"], **HELD_OUT,
                           train_tokens=1, eval_blocks=eval_blocks)
    analysis = analyze_masks(model, *blocks["validation"])
    summary = analysis.to_dict()
    summary["held_out_loss"] = mean_loss(model.eval(), *blocks["validation"], batch_size=8)
    write_analysis(Path(run), analysis, summary)
    return summary


def write_analysis(run: Path, analysis: MaskAnalysis, summary: dict) -> None:
    """RUN/analysis.json (`summary`), RUN/analysis.md (per-layer table) and RUN/experts.png."""
    write_json(run / ANALYSIS, summary)
    atomic_write_text(run / ANALYSIS_TABLE, f"# Mask experts over {analysis.tokens} held-out tokens\n\n"
                      f"Active per token: {analysis.active_ratio:.1%} of FFN neurons.\n\n{analysis_table(analysis)}\n\n"
                      f"![experts]({EXPERTS_PLOT})\n")
    plot_experts(analysis, run / EXPERTS_PLOT)
