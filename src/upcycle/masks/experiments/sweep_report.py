"""The mask sweep's report: OUT/report.md (settings, the Pareto table, per-layer achieved active fractions) and
OUT/pareto.png (quality against active fraction and measured latency), from a `sweep` summary."""

from __future__ import annotations

from pathlib import Path

LABELS = {"dense": "dense", "masks": "mask experts (MoM)", "moefication": "MoEfication",
          "pruning": "magnitude pruning + fine-tune", "teal": "TEAL thresholds"}
"""How each of the sweep's methods is named in the tables and plots."""


def plot_pareto(points: list[dict], quality: str, path: Path) -> None:
    """Held-out perplexity against the achieved active FFN fraction and against measured latency, per method.

    Latency is plotted relative to the dense model timed in the same rounds (1 / speed-up), so that sweeps run as
    separate processes can share one plot.
    """
    from upcycle.eval.report import pyplot, save_figure

    plt = pyplot()
    dense = next(p for p in points if p["method"] == "dense")
    axes_spec = [("achieved_active_ratio", "FFN weights active per token (fraction of dense)"),
                 ("decode_speedup", "decode time per token, batch 1 (relative to dense)"),
                 ("prefill_speedup", "prefill time (relative to dense)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (field, label) in zip(axes, axes_spec, strict=True):
        def x(p, field=field):
            return p[field] if field == "achieved_active_ratio" else 1.0 / p[field]
        for method in [m for m in LABELS if m != "dense"]:
            own = sorted((p for p in points if p["method"] == method), key=lambda p: p["target"])
            if own:
                ax.plot([x(p) for p in own], [p["perplexity"] for p in own], "o-", label=LABELS[method])
                for p in own:
                    ax.annotate(f"{p['target']:g}", (x(p), p["perplexity"]), fontsize=7, alpha=0.7)
        ax.plot([x(dense)], [dense["perplexity"]], "k*", markersize=12, label="dense")
        ax.axhline(dense["perplexity"] * 1.05, color="grey", linestyle=":", linewidth=1, label="dense + 5%")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{quality} perplexity")
    axes[0].legend(fontsize=7)
    fig.suptitle("Quality against active FFN fraction and measured latency (labels: target)", fontsize=10)
    save_figure(fig, path)


def sweep_report(summary: dict) -> str:
    """OUT/report.md: settings, the Pareto table, per-layer achieved active fractions, the plot."""
    points = summary["points"]
    dense = next(p for p in points if p["method"] == "dense")
    quality = summary["quality_split"]
    table = _pareto_table(points, dense, quality)
    layers = _layer_table(points, dense)
    config = summary["config"]
    train = config["train"]
    prefill_tokens = dense["latency"]["prefill_tokens"]
    merged = (f"\nMerged from {summary['merged_from']} sweeps run as separate processes (wall time: the longest); "
              "speed-ups are relative to the dense model timed in each one's own rounds, the dense row is the "
              "first sweep's.\n") if summary.get("merged_from") else ""
    return f"""# Mask experts vs baselines

`{summary['command']}` — base `{summary['base']}`, data `{summary['data']}`, {summary['seconds'] / 60:.1f} min.
{merged}

Mask runs: {config['masks']['experts']} experts, top-{config['masks']['top_k']} {config['masks']['routing']} routing,
{train['steps']} steps × {train['batch_size']} blocks × {config['block_size']} tokens
({summary['training_tokens_per_run']:,} training tokens per run; pruning fine-tunes and MoEfication's routers fit on as
many), lr {train['lr']}, λ lr {config['lambda_lr']}, target warm-up {config['warmup_fraction']:.0%} of the steps.
Baselines: {summary['baselines']}.

Quality is perplexity on the {quality} split (settings were chosen on validation only). "Achieved active" is the
fraction of the dense FFN's weight rows each token reads, measured on the {quality} blocks, averaged over layers
(neurons computed for masks / MoEfication / pruning; for TEAL, ⅔ × kept inputs + ⅓ × kept activations). FLOPs ×:
whole-model matmul FLOPs of a {config['block_size']}-token forward relative to dense. Latency: this CPU,
{summary['torch_threads']} torch thread(s), all models timed side by side in one process (median of interleaved
rounds, each row beside the dense model timed in the same rounds, in brackets; load average
at the end {', '.join(f'{v:.1f}' for v in summary['load_average_at_end'])}); decode is batch 1,
{dense['latency']['decode_steps']} steps after a {dense['latency']['prompt_tokens']}-token prompt; prefill is
{prefill_tokens} tokens in one batch. Masks and MoEfication run through the
compact sparse FFN (`upcycle.ops.sparse_ffn.SparseFFN`); pruning is a smaller dense FFN; TEAL decodes through
`input_sparse_ffn` (row gathers, no fused kernel) and prefills densely with the zeros applied.

{table}

## Achieved active fraction per layer

{layers}

![pareto](pareto.png)
"""


def _pareto_table(points: list[dict], dense: dict, quality: str) -> str:
    """One row per sweep point: target, achieved active fraction, perplexities, FLOPs and latency beside dense's.

    Each row's latency is set beside the dense model timed in the same rounds (`dense_latency`, present in merged
    sweeps), falling back to the dense row's own.
    """
    from upcycle.eval.report import markdown_table

    rows = []
    for p in points:
        lat, ref = p["latency"], p.get("dense_latency", dense["latency"])
        rows.append([LABELS[p["method"]], "" if p["method"] == "dense" else f"{p['target']:.0%}",
                     f"{p['achieved_active_ratio']:.1%}", f"{p['perplexity']:.3f}",
                     f"{p['perplexity'] / dense['perplexity'] - 1:+.1%}", f"{p['perplexities']['validation']:.3f}",
                     f"{p['flops_ratio']:.2f}", f"{lat['decode_ms_per_token']:.2f} ({ref['decode_ms_per_token']:.2f})",
                     f"{p['decode_speedup']:.2f}", f"{lat['prefill_ms']:.1f} ({ref['prefill_ms']:.1f})",
                     f"{p['prefill_speedup']:.2f}", p.get("training_tokens", 0)])
    return markdown_table(["method", "target", "achieved active", f"{quality} ppl", "vs dense", "validation ppl",
                           "FLOPs ×", "decode ms/token (dense)", "decode speed-up", "prefill ms (dense)",
                           "prefill speed-up", "training tokens"], rows)


def _layer_table(points: list[dict], dense: dict) -> str:
    """The achieved active fraction of each layer, one row per sweep point, and their mean."""
    from upcycle.eval.report import markdown_table

    layer_count = len(dense["layer_active_ratios"])
    rows = [[LABELS[p["method"]], "" if p["method"] == "dense" else f"{p['target']:.0%}",
             *(f"{r:.1%}" for r in p["layer_active_ratios"]), f"{p['achieved_active_ratio']:.1%}"]
            for p in points]
    return markdown_table(["method", "target", *(f"layer {i}" for i in range(layer_count)), "mean"], rows)
