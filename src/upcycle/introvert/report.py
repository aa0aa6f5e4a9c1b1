"""Write RUN/report.md and its plots from RUN/eval/results.json (and the ablation results, when present)."""

from __future__ import annotations

from pathlib import Path

from upcycle.eval.report import markdown_table, pyplot, save_figure
from upcycle.introvert.run import Run
from upcycle.io import atomic_write_text, read_json

METHOD_LABELS = {
    "base": "base (no training)",
    "routed": "routed experts (prompt -> nearest centroid)",
    "oracle": "oracle routing (document's own cluster)",
    "best": "best expert per document (upper bound)",
    "random": "random routing (control)",
    "lora-all": "one LoRA, all data, same tokens (compute-matched)",
    "lora-wide": "one LoRA of rank K*r (parameter-matched)",
    "full": "continued full training, same tokens",
}


GUARD_LABELS = {
    "base": "base (no training)",
    "routed": "routed top-1, no guard",
    "guarded-base": "guarded: beyond the threshold -> base",
    "guarded-mixture": "guarded: beyond the threshold -> top-2 mixture",
}


def method_label(name: str, results: dict | None = None) -> str:
    """The readable name of a method; a top-k mixture says its k and the temperature chosen on validation."""
    if name.startswith("routed-top"):
        k = name.removeprefix("routed-top")
        chosen = ((results or {}).get("mixture") or {}).get("chosen", {}).get(k)
        return f"routed top-{k} mixture (c-BTM{f', T={chosen:g} chosen on validation' if chosen else ''})"
    return METHOD_LABELS.get(name) or GUARD_LABELS.get(name, name)


def _ordered_methods(results: dict) -> list[str]:
    """Methods in reading order: base, routed, the top-k mixtures, then the controls and baselines."""
    mixtures = sorted((n for n in results["methods"] if n.startswith("routed-top")), key=lambda n: int(n[10:]))
    order = ["base", "routed", *mixtures, *[n for n in METHOD_LABELS if n not in ("base", "routed")]]
    return [n for n in order if n in results["methods"]]


def _perplexity_rows(methods: dict, names: list[str], labels: list[str], base: float) -> list[list[object]]:
    rows = []
    for name, label in zip(names, labels):
        m = methods[name]
        ci = m.get("ci95")
        rows.append([label, m["perplexity"], f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "",
                     f"{100 * (m['perplexity'] / base - 1):+.1f}%"])
    return rows


def results_table(results: dict) -> tuple[list[str], list[list[object]]]:
    """Header and rows of the main table: method, perplexity, 95% CI, and delta vs base."""
    names = _ordered_methods(results)
    rows = _perplexity_rows(results["methods"], names, [method_label(n, results) for n in names],
                            results["methods"]["base"]["perplexity"])
    return ["method", f"{results['split']} perplexity", "95% CI (bootstrap over docs)", "vs base"], rows


def _paired_table(paired: list[dict]) -> str:
    rows = [[method_label(p["method"]).split(" (")[0], method_label(p["reference"]).split(" (")[0],
             f"{p['delta_pct']:+.2f}%", f"{p['ci95_pct'][0]:+.2f}% to {p['ci95_pct'][1]:+.2f}%"] for p in paired]
    return markdown_table(["method", "reference", "perplexity change", "95% CI (paired bootstrap)"], rows)


def write_report(run: Run | str | Path) -> Path:
    """Render report.md with tables and PNG plots next to it; returns the report path."""
    run = Run.of(run)
    results = read_json(run.eval_dir / "results.json")
    meta = run.meta
    k = results["k"]
    lines = [f"# Introvert experts: {run.path.name}", "",
             f"Base `{meta['base']}`, data `{meta['data']}`, K = {k} clusters "
             f"({meta['clusters'].get('embedder', '?')} embeddings), {results['documents']} {results['split']} "
             f"documents, first {results['config']['max_tokens_per_doc']} tokens of each scored.", "",
             "## Held-out perplexity", "", markdown_table(*results_table(results)), ""]
    if results.get("paired"):
        lines += ["Paired comparisons (the same documents resampled for both methods; a negative change means lower "
                  "perplexity than the reference):", "", _paired_table(results["paired"]), ""]
    lines += _mixture_section(results)
    lines += _guard_section(results)
    routing = results["routing"]
    lines += ["## Routing", "",
              f"- routing accuracy (prompt of {results['config']['route_chars']} chars -> own cluster): "
              f"{100 * routing['accuracy']:.1f}% of {routing['documents']} documents",
              *([f"- routed expert is the best expert for {100 * routing['best_expert_accuracy']:.1f}% of documents"]
                if routing.get("best_expert_accuracy") is not None else []), ""]
    lines += _base_section(run)
    lines += _per_cluster_section(run, results)
    lines += _cost_section(results)
    ablation = run.eval_dir / "ablation.json"
    if ablation.is_file():
        lines += _ablation_section(run, read_json(ablation))
    lines += ["## Reproduce", "", "```", *meta.get("commands", []), "```", ""]
    path = run.path / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _mixture_section(results: dict) -> list[str]:
    """The temperature grid the top-k mixtures were tuned on (validation split)."""
    grid = (results.get("mixture") or {}).get("validation_perplexity") or {}
    if not grid:
        return []
    temperatures = list(next(iter(grid.values())))
    rows = [[f"top-{k}", *[values[t] for t in temperatures], results["mixture"]["chosen"][k]]
            for k, values in grid.items()]
    return ["## Top-k mixtures (c-BTM)", "",
            f"Each document is scored by the mixture of the k experts nearest to its prompt, weights softmax(-d²/T). "
            f"T is chosen per k on the {results['mixture']['validation_documents']} validation documents (never on "
            "the test split):", "",
            markdown_table(["k", *[f"T={t}" for t in temperatures], "chosen T"], rows), ""]


def _guard_section(results: dict) -> list[str]:
    """The out-of-domain guard: threshold, documents flagged, perplexities in domain and on a held-out domain."""
    guard = results.get("guard")
    if not guard:
        return []
    flagged = guard["validation_prompts_flagged"]
    lines = ["## Out-of-domain guard", "",
             f"Threshold d² = {guard['threshold']:.4f}: the {guard['percentile']:g}th percentile of the validation "
             f"documents' squared distances to their nearest centroid. Beyond it a request goes to the base, or to "
             f"the top-2 mixture (T = {guard['out_of_domain_temperature']:g})."
             + (f" It flags {100 * flagged:.1f}% of the validation prompts." if flagged is not None else ""), ""]
    for split, title in ((results["split"], f"in domain ({results['split']} split)"),
                         ("heldout", f"held-out domain `{(guard.get('heldout') or {}).get('data')}`")):
        entry = guard.get(split)
        if not entry:
            continue
        names = [n for n in GUARD_LABELS if n in entry["methods"]]
        base = entry["methods"].get("base", entry["methods"]["routed"])["perplexity"]
        lines += [f"### {title}", "",
                  f"The guard flags {entry['flagged']} of {entry['documents']} documents "
                  f"({100 * entry['flagged_share']:.1f}%).", "",
                  markdown_table(["method", "perplexity", "95% CI (bootstrap over docs)",
                                  "vs base" if "base" in entry["methods"] else "vs routed"],
                                 _perplexity_rows(entry["methods"], names, [GUARD_LABELS[n] for n in names], base)),
                  "", _paired_table(entry["paired"]), ""]
    return lines


def _base_section(run: Run) -> list[str]:
    """How the base was trained, when it was built by `upcycle pretrain` (its pretrain.json travels with it)."""
    import shutil

    base = Path(run.meta["base"])
    if not (base / "pretrain.json").is_file():
        return []
    recipe = read_json(base / "pretrain.json")
    if (base / "loss_curve.png").is_file():
        shutil.copyfile(base / "loss_curve.png", run.path / "base_loss_curve.png")
    last = ", ".join(f"{e['perplexity']:.2f}" for e in recipe["eval_curve"][-3:])
    return ["## Base model", "",
            f"{recipe['parameters']:,} parameters, trained by `upcycle pretrain` on {recipe['train_tokens']:,} tokens "
            f"in {recipe['train_seconds'] / 60:.0f} min; validation perplexity {recipe['validation_perplexity']:.2f} "
            f"(last three evaluations: {last}). Weights sha256 "
            f"`{recipe['weights_sha256'][:16]}...`.", "", "![base loss curve](base_loss_curve.png)", ""]


def _per_cluster_section(run: Run, results: dict) -> list[str]:
    plt = pyplot()
    k = results["k"]
    names = [n for n in ("base", "routed", "oracle", "lora-all", "full") if n in results["methods"]]
    per_cluster = {n: results["methods"][n]["per_cluster"] for n in names}
    scored = [c for c in range(k) if per_cluster["base"].get(str(c))]  # clusters with held-out documents
    compared = [n for n in names if n != "base"]
    # Differences between methods are a few percent at most: plot the change vs base, not absolute perplexity.
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(scored) + 2), 3.5))
    width = 0.8 / max(len(compared), 1)
    for j, name in enumerate(compared):
        change = [100 * (per_cluster[name][str(c)] / per_cluster["base"][str(c)] - 1) for c in scored]
        ax.bar([i + j * width for i in range(len(scored))], change, width, label=name)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("cluster")
    ax.set_ylabel("perplexity change vs base (%)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scored))], [str(c) for c in scored])
    ax.legend(fontsize=7)
    save_figure(fig, run.path / "per_cluster.png")

    sizes = run.meta["clusters"].get("sizes", [])
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * k + 2), 3))
    ax.bar(range(len(sizes)), sizes)
    ax.set_xlabel("cluster")
    ax.set_ylabel("training documents")
    save_figure(fig, run.path / "cluster_sizes.png")

    summary_path = run.clusters_dir / "summary.json"
    terms = {}
    if summary_path.is_file():
        for entry in read_json(summary_path):
            terms[int(entry["cluster"])] = ", ".join(entry.get("top_terms", [])[:6])
    held_out = results["cluster_sizes"][results["split"]]
    rows = [[c, sizes[c] if c < len(sizes) else "", held_out[c], terms.get(c, ""),
             *[results["methods"][n]["per_cluster"].get(str(c)) for n in names]] for c in range(k)]
    header = ["cluster", "train docs", f"{results['split']} docs", "top terms", *names]
    return ["## Per cluster", "", markdown_table(header, rows),
            "", "![per-cluster change vs base](per_cluster.png)", "", "![cluster sizes](cluster_sizes.png)", ""]


def _cost_section(results: dict) -> list[str]:
    cost = results["cost"]
    train = results["training"]
    rows = [["base", cost["base_flops_per_token"], f"{cost['base_ms_per_token']:.3f}", ""],
            ["routed", cost["routed_flops_per_token"], f"{cost['routed_ms_per_token']:.3f}",
             f"{cost['routing_ms_per_request']:.1f} ms routing per request"]]
    train_rows = [[name, v["tokens"], f"{v['seconds']:.0f}", f"{v['tokens_per_second']:.0f}"]
                  for name, v in train.items()]
    return ["## Cost", "", markdown_table(["model", "FLOPs / token", "ms / token (batch 1)", ""], rows), "",
            cost["note"], "", markdown_table(["training", "tokens", "seconds", "tokens/s"], train_rows), ""]


def _ablation_section(run: Run, ablation: dict) -> list[str]:
    plt = pyplot()
    rows, ks = [], sorted(int(k) for k in ablation["by_k"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in ("routed", "oracle"):
        means = [ablation["by_k"][str(k)][method]["mean"] for k in ks]
        errs = [ablation["by_k"][str(k)][method]["ci95_halfwidth"] for k in ks]
        ax.errorbar(ks, means, yerr=errs, marker="o", capsize=3, label=method)
    ax.axhline(ablation["base_perplexity"], color="gray", linestyle="--", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clusters K (same total training tokens)")
    ax.set_ylabel(f"{ablation['split']} perplexity")
    ax.legend()
    save_figure(fig, run.path / "ablation_k.png")
    for k in ks:
        entry = ablation["by_k"][str(k)]
        rows.append([k, entry["seeds"], f"{entry['routed']['mean']:.2f} ± {entry['routed']['ci95_halfwidth']:.2f}",
                     f"{entry['oracle']['mean']:.2f} ± {entry['oracle']['ci95_halfwidth']:.2f}",
                     f"{100 * entry['routing_accuracy']['mean']:.1f}%"])
    return ["## Number of clusters", "",
            markdown_table(["K", "seeds", "routed ppl (mean ± 95% CI)", "oracle ppl", "routing accuracy"], rows), "",
            "![perplexity vs K](ablation_k.png)", ""]
