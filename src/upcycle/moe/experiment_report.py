"""The Flan-MoE experiment's report: report.md with its tables, and the plots of held-out metrics, routing
statistics over training and training losses (from the cells `upcycle.moe.experiment` wrote)."""

from __future__ import annotations

from pathlib import Path

from upcycle.moe.config import CONDITIONS, METRICS


def write_report(out: Path, results: dict) -> Path:
    """report.md with the tables and plots (held-out metrics, routing over training, training curves)."""
    from upcycle.eval.report import markdown_table
    from upcycle.io import atomic_write_text, read_json

    cells = {str(p.relative_to(out / "cells").with_suffix("")): read_json(p) for p in (out / "cells").rglob("*.json")}
    _plot_heldout(out, results)
    _plot_routing(out, cells)
    _plot_losses(out, cells)
    header, rows = _heldout_table(results)
    diff_rows = _difference_rows(results)
    flops = results.get("flops", {})
    settings = read_json(out / "experiment.json")
    mixture = read_json(out / "mixture.json")
    lines = [
        "# Flan-MoE experiment: instruction tuning, dense vs sparse MoE at equal FLOPs per token", "",
        f"Seeds {results['seeds']}; means ± half-width of the 95% Student-t interval over seeds. Held-out task types "
        f"(never in the instruction mixture): {', '.join(results['held_out_tasks'])}; instruction mixture: "
        f"{', '.join(mixture['train_tasks'])}. Metrics are on the test-split responses of the held-out tasks "
        "(prompt tokens are not scored); exact match is teacher-forced greedy (every response token and the EOS are "
        "the argmax).", "",
        f"MoE: the base sparse-upcycled in {flops.get('moe_layers')} of its layers into "
        f"{settings['moe']['num_experts']} experts, router {settings['moe']['router']} (k={settings['moe']['top_k']}), "
        f"{settings['moe']['dispatch']} dispatch (cf {settings['moe']['capacity_factor']} train / "
        f"{settings['moe']['eval_capacity_factor']} eval). FFN FLOPs per token MoE/dense = "
        f"{flops.get('ratio', float('nan')):.4f} (the router's [D, E] matmul is the difference).", "",
        "## Answer", "", "```", results["answer"], "```", "",
        "## Held-out tasks after fine-tuning", "", markdown_table(header, rows), "",
        "## Paired differences (same seed)", "",
        "Gains are positive when instruction tuning helps (lower loss, higher exact match).", "",
        markdown_table(["difference", "mean ± 95% CI"], diff_rows), "",
        "## Before fine-tuning", "",
        markdown_table(["model", "held-out loss", "exact match"], _start_rows(results)), "",
        "![held-out metrics](heldout.png)", "", "## Routing over training", "",
        "Expert utilisation = tokens dispatched to an expert / its capacity (max and min over experts, mean over MoE "
        "layers); drop ratio = share of routed assignments that found their expert full.", "",
        "![routing](routing.png)", "", "![training loss](training_loss.png)", "",
        f"Training time of all cells: {results['cell_seconds'] / 60:.1f} min.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _mean_ci(summary: dict, digits: int = 3) -> str:
    """'mean ± half-width of the 95% interval' of a seed summary; the mean alone when one seed gives no interval."""
    ci = "" if summary["ci95"] is None else f" ± {summary['ci95']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}{ci}"


def _heldout_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the held-out table: one row per architecture/condition, then each task's metrics."""
    tasks = results["held_out_tasks"]
    rows = []
    for name, row in results["conditions"].items():
        arch, cond = name.split("/")
        rows.append([arch, "instruction-tuned, then fine-tuned" if cond == "instruct" else "fine-tuned only",
                     _mean_ci(row["loss"]), _mean_ci(row["perplexity"], 2), _mean_ci(row["exact_match"])]
                    + [_mean_ci(row["tasks"][t][m]) for t in tasks for m in METRICS])
    header = ["model", "recipe", "held-out loss (nats/token)", "perplexity", "exact match (mean of tasks)",
              *[f"{'loss' if m == 'loss' else 'EM'} {t}" for t in tasks for m in METRICS]]
    return header, rows


def _difference_rows(results: dict) -> list[list[str]]:
    """Rows of the paired-differences table: instruction-tuning gains, their interaction, MoE - dense per recipe."""
    rows = []
    for metric in METRICS:
        g = results["instruction_gain"][metric]
        rows += [[f"instruction-tuning gain, dense ({metric})", _mean_ci(g["dense"], 4)],
                 [f"instruction-tuning gain, MoE ({metric})", _mean_ci(g["moe"], 4)],
                 [f"MoE gain - dense gain ({metric})",
                  _mean_ci(results["interaction_moe_minus_dense_gain"][metric], 4)]]
        for cond in CONDITIONS:
            rows.append([f"MoE - dense, {cond} ({metric})", _mean_ci(results["moe_minus_dense"][metric][cond], 4)])
    return rows


def _start_rows(results: dict) -> list[list[str]]:
    """Rows of the before-fine-tuning table: the dense base, the MoE just upcycled, both instruction-tuned."""
    start, zs = results["start"], results["zero_shot_after_instruct"]
    return [["dense base (untrained on instructions)", f"{start['dense']['loss']:.3f}",
             f"{start['dense']['exact_match']:.3f}"],  # one unseeded cell: a number, no interval
            ["MoE just upcycled", _mean_ci(start["moe"]["loss"]), _mean_ci(start["moe"]["exact_match"])],
            ["dense, instruction-tuned (zero-shot)", _mean_ci(zs["dense"]["loss"]),
             _mean_ci(zs["dense"]["exact_match"])],
            ["MoE, instruction-tuned (zero-shot)", _mean_ci(zs["moe"]["loss"]), _mean_ci(zs["moe"]["exact_match"])]]


def _plot_heldout(out: Path, results: dict) -> None:
    from upcycle.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results["conditions"])
    for ax, metric in zip(axes, METRICS, strict=True):
        means = [results["conditions"][n][metric]["mean"] for n in names]
        errors = [results["conditions"][n][metric]["ci95"] or 0.0 for n in names]
        ax.bar(range(len(names)), means, yerr=errors, capsize=4,
               color=["#7f9fbf", "#2f5f8f", "#d9a36b", "#b5651d"][:len(names)])
        ax.set_xticks(range(len(names)), [n.replace("/", "\n") for n in names], fontsize=8)
        ax.set_ylabel({"loss": "held-out loss (nats/token)", "exact_match": "exact match"}[metric])
        if metric == "loss":
            low = min(m - e for m, e in zip(means, errors, strict=True))
            ax.set_ylim(bottom=max(0.0, low - 0.1 * abs(low)))
    save_figure(fig, out / "heldout.png")


def _series(cells: dict[str, dict], prefix: str, key: str) -> list[float]:
    """Mean over the matching cells (seeds) of a per-step history value."""
    runs = [[h.get(key, float("nan")) for h in c["train"]["history"]] for n, c in sorted(cells.items())
            if n.startswith(prefix)]
    if not runs:
        return []
    steps = min(len(r) for r in runs)
    return [sum(r[i] for r in runs) / len(runs) for i in range(steps)]


def _plot_routing(out: Path, cells: dict[str, dict]) -> None:
    from upcycle.eval.report import pyplot, save_figure

    plt = pyplot()
    stages = [("instruction tuning", "instruct/moe-"), ("fine-tuning, direct", "finetune/moe-direct-"),
              ("fine-tuning after instruction tuning", "finetune/moe-instruct-")]
    fig, axes = plt.subplots(1, len(stages), figsize=(12, 3.4), sharey=True)
    for ax, (title, prefix) in zip(axes, stages, strict=True):
        for key, label in (("moe/utilisation_max", "utilisation max"), ("moe/utilisation_min", "utilisation min"),
                           ("moe/dropped_fraction", "drop ratio")):
            values = _series(cells, prefix, key)
            if values:
                ax.plot(range(1, len(values) + 1), values, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("mean over seeds and MoE layers")
    axes[0].legend(fontsize=7)
    save_figure(fig, out / "routing.png")


def _plot_losses(out: Path, cells: dict[str, dict]) -> None:
    from upcycle.eval.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for arch in ("dense", "moe"):
        key = "lm_loss" if arch == "moe" else "loss"
        values = _series(cells, f"instruct/{arch}-", key)
        axes[0].plot(range(1, len(values) + 1), values, label=arch)
        for cond in CONDITIONS:
            values = _series(cells, f"finetune/{arch}-{cond}-", key)
            axes[1].plot(range(1, len(values) + 1), values, label=f"{arch}, {cond}")
    axes[0].set_title("instruction tuning (LM loss on responses)", fontsize=9)
    axes[1].set_title("fine-tuning on held-out tasks", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    save_figure(fig, out / "training_loss.png")
