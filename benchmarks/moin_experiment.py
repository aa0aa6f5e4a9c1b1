"""The experiment of issue 15: when do introvert experts win? Routed top-1/2/4 against the compute-matched LoRA, the
parameter-matched LoRA and continued full training at equal training tokens, over the number of clusters K and the
corpus diversity (one domain vs many), with seeds and 95% intervals, and the out-of-domain guard on a held-out domain.

    python benchmarks/moin_experiment.py [--data data/system-docs] [--out runs/moin-experiment]
        [--clusters 2 4 8] [--seeds 0 1 2] [--total-tokens 393216] [--heldout DOMAIN] [--one-domain DOMAIN]
        [--base default] [--corpora many one] [--expert-args FLAGS] [--baseline-args FLAGS] [--eval-args FLAGS]
        [--no-baselines] [--dry-run]

--data is a corpus with one folder per domain (`make real` builds data/system-docs). One domain (--heldout, default
the last) is kept out of every run and scored by the guard; "many" is every other domain, "one" is --one-domain (the
largest by default). Each cell (corpus, K, seed) is a run directory made by the usual commands (cluster,
train-experts, train-baselines, evaluate); a cell whose eval/results.json exists is skipped, and each command resumes
its own finished work, so rerunning continues an interrupted experiment. Everything the commands print goes to
OUT/experiment.log. At the end OUT/summary.json (printed) and OUT/summary.md hold, per (corpus, K), each method's
test perplexity as mean ± 95% t-interval over seeds, the paired changes against the baselines, and the guard's
figures. Temperatures and the guard's threshold are chosen on validation by `evaluate`; nothing looks at test.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("moin_experiment")
METHODS = ["base", "routed", "routed-top2", "routed-top4", "random", "lora-all", "lora-wide", "full"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/system-docs", help="a corpus with one folder per domain")
    parser.add_argument("--out", default="runs/moin-experiment")
    parser.add_argument("--clusters", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--total-tokens", type=int, default=4 * 98_304, help="expert training tokens, all K alike")
    parser.add_argument("--heldout", default=None, help="domain kept out of every run (default: the last)")
    parser.add_argument("--one-domain", default=None, help="the single-domain corpus (default: the largest)")
    parser.add_argument("--base", default=None, help="base model (default: the shipped tiny Llama)")
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--corpora", nargs="+", default=["many", "one"], choices=["many", "one"])
    parser.add_argument("--expert-args", default="", help="more train-experts flags, e.g. '--expert.block_size 256'")
    parser.add_argument("--baseline-args", default="", help="more train-baselines flags")
    parser.add_argument("--eval-args", default="", help="more evaluate flags, e.g. '--eval.max_tokens_per_doc 256'")
    parser.add_argument("--no-baselines", action="store_true",
                        help="train and score no baselines (experts, mixtures and the guard only)")
    parser.add_argument("--dry-run", action="store_true", help="write the corpora, print the plan, run nothing")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(out / "experiment.log"), logging.StreamHandler(sys.stderr)])
    corpora, heldout = write_corpora(Path(args.data), out / "corpora", args.heldout, args.one_domain)
    # K outermost, in the order given: an interrupted grid has whole (K, corpus) cells over every seed
    cells = [(corpus, k, seed) for k in args.clusters for corpus in args.corpora for seed in args.seeds]
    for corpus, k, seed in cells:
        run = out / f"{corpus}-k{k}-seed{seed}"
        if (run / "eval" / "results.json").is_file():
            log.info("%s: done, skipped", run)
        elif args.dry_run:
            log.info("%s: to run", run)
        else:
            run_cell(run, corpora[corpus], heldout, k, seed, args)
    if not args.dry_run:
        summary = summarise(out, corpora, args.clusters, args.seeds)
        print(json.dumps(summary, indent=1))


def write_corpora(data: Path, root: Path, heldout: str | None, one: str | None) -> tuple[dict[str, Path], Path]:
    """{'many': ..., 'one': ...} and the held-out domain, each a .jsonl file of its documents."""
    from upcycle.data import load_documents
    from upcycle.io import atomic_write_text

    docs = load_documents(str(data))
    domain = lambda doc: doc.id.split("/")[0]  # noqa: E731 - a directory corpus names documents domain/file
    sizes = Counter(domain(d) for d in docs)
    if len(sizes) < 3:
        sys.exit(f"{data}: needs at least three domain folders (found {sorted(sizes)}); build it with `make real`")
    heldout = heldout or sorted(sizes)[-1]
    one = one or max((d for d in sizes if d != heldout), key=lambda d: (sizes[d], d))
    if heldout not in sizes or one not in sizes or one == heldout:
        sys.exit(f"--heldout {heldout} / --one-domain {one}: choose two different domains of {sorted(sizes)}")
    views = {"many": [d for d in docs if domain(d) != heldout], "one": [d for d in docs if domain(d) == one],
             "heldout": [d for d in docs if domain(d) == heldout]}
    paths = {}
    for name, chosen in views.items():
        paths[name] = root / f"{name}.jsonl"
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(paths[name], "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in chosen))
    log.info("corpora: many = %s, one = %s, held out = %s (%s documents)",
             {d: n for d, n in sizes.items() if d != heldout}, one, heldout, len(views["heldout"]))
    return {"many": paths["many"], "one": paths["one"]}, paths["heldout"]


def run_cell(run: Path, corpus: Path, heldout: Path, k: int, seed: int, args: argparse.Namespace) -> None:
    """One (corpus, K, seed) cell: the pipeline's own commands, each resuming what it finished before."""
    base = ["--base", args.base] if args.base else []
    tokens = str(max(1, args.total_tokens // k))
    sibling = embedded_sibling(run)
    if sibling is not None and not (run / "run.json").is_file():
        # Same corpus, same splits (their seed is not the cell's): refit k-means on the sibling's saved embeddings
        # instead of embedding every document again, as `introvert ablate` does.
        from upcycle.introvert.clustering.corpus import refit_clusters
        from upcycle.introvert.config import ClusterConfig
        from upcycle.introvert.run import Run

        log.info("%s: clusters refitted on %s's embeddings", run.name, sibling.name)
        refit_clusters(Run.open(sibling), run, ClusterConfig(clusters=k, embedder=args.embedder, seed=seed))
    steps = [
        ["introvert", "cluster", "--data", str(corpus), *base, "--out", str(run), "--clustering.clusters", str(k),
         "--clustering.embedder", args.embedder, "--clustering.seed", str(seed)],
        ["introvert", "train-experts", str(run), "--expert.tokens_per_expert", tokens, "--expert.seed", str(seed),
         *shlex.split(args.expert_args)],
        ["introvert", "train-baselines", str(run), *shlex.split(args.baseline_args)],
        # top-1/2/4 by default, k capped at K
        ["introvert", "evaluate", str(run), "--eval.heldout_data", str(heldout), "--eval.seed", str(seed),
         *(["--eval.baselines", "false"] if args.no_baselines else []), *shlex.split(args.eval_args)],
    ]
    if args.no_baselines:
        del steps[2]
    with open(Path(args.out) / "experiment.log", "a") as sink:
        for argv in steps:
            start = time.perf_counter()
            log.info("%s: upcycle %s", run.name, " ".join(argv))
            sink.flush()
            code = subprocess.call([sys.executable, "-m", "upcycle.cli", *argv], stdout=sink, stderr=sink)
            if code != 0:
                sys.exit(f"{run}: `upcycle {' '.join(argv)}` failed (exit {code}); see {args.out}/experiment.log")
            log.info("%s: finished in %.0f s", run.name, time.perf_counter() - start)


def embedded_sibling(run: Path) -> Path | None:
    """Another cell of the same corpus whose cluster step finished (its embeddings saved), or None."""
    prefix = run.name.split("-k")[0] + "-k"
    for other in sorted(run.parent.glob(f"{prefix}*")):
        if other != run and (other / "run.json").is_file() and (other / "clusters" / "embeddings").is_dir():
            return other
    return None


def summarise(out: Path, corpora: dict[str, Path], clusters: list[int], seeds: list[int]) -> dict:
    """Per (corpus, K): each method's perplexity and each paired change, mean ± 95% t-interval over seeds."""
    from upcycle.eval.stats import mean_ci
    from upcycle.io import atomic_write_text, write_json

    summary: dict = {}
    for corpus in corpora:
        for k in clusters:
            results = [json.loads((out / f"{corpus}-k{k}-seed{s}" / "eval" / "results.json").read_text())
                       for s in seeds if (out / f"{corpus}-k{k}-seed{s}" / "eval" / "results.json").is_file()]
            if not results:
                continue
            cell = {"seeds": len(results),
                    "methods": {m: mean_ci([r["methods"][m]["perplexity"] for r in results])
                                for m in METHODS if all(m in r["methods"] for r in results)},
                    "paired_pct": {f"{p['method']} vs {p['reference']}": mean_ci(
                        [next(q["delta_pct"] for q in r["paired"] if (q["method"], q["reference"]) ==
                              (p["method"], p["reference"])) for r in results]) for p in results[0]["paired"]}}
            guards = [r["guard"] for r in results if "heldout" in r.get("guard", {})]
            if guards:
                cell["guard"] = {"flagged_heldout": mean_ci([g["heldout"]["flagged_share"] for g in guards]),
                                 "flagged_test": mean_ci([g["test"]["flagged_share"] for g in guards]),
                                 **{f"heldout {m}": mean_ci([g["heldout"]["methods"][m]["perplexity"] for g in guards])
                                    for m in ("base", "routed", "guarded-base", "guarded-mixture")}}
            summary[f"{corpus} K={k}"] = cell
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    return summary


def summary_markdown(summary: dict) -> str:
    """One row per (corpus, K): mean ± 95% half-width over seeds of each method's test perplexity."""
    def cell(value: dict | None) -> str:
        if value is None:
            return ""
        return f"{value['mean']:.2f}" + (f" ± {value['ci95']:.2f}" if value["ci95"] is not None else "")

    lines = ["| corpus, K | seeds | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 2) + "|"]
    for name, entry in summary.items():
        lines.append(f"| {name} | {entry['seeds']} | "
                     + " | ".join(cell(entry["methods"].get(m)) for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
