"""Issue 15's add-data experiment: grow a run with a new domain (`upcycle introvert add-data`) against rebuilding it
from scratch on all the data, at the same tokens per expert. Reports the training tokens each spent and the test
perplexity each reaches on the same documents, with a paired 95% interval.

    python benchmarks/moin_add_data.py [--data data/system-docs] [--out runs/moin-add] [--new perl]
        [--heldout system] [--clusters 4] [--tokens-per-expert 24576] [--seed 0] [--base default]

--data is a corpus with one folder per domain (`make real` builds data/system-docs). The run first grows from
every domain except --new and --heldout (K clusters), then `add-data` adds --new; the rebuild clusters all of them
into as many clusters as the grown run ended with and trains every expert. `evaluate` scores the grown run's routed
experts and, through --eval.reference_run, the rebuilt run's, on the grown run's test documents (both runs split
by the same hash of each text, so neither trained on them). Each step resumes its finished work when rerun; output
goes to OUT/experiment.log, the figures to OUT/summary.json (printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("moin_add_data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/system-docs", help="a corpus with one folder per domain")
    parser.add_argument("--out", type=Path, default=Path("runs/moin-add"))
    parser.add_argument("--new", default="perl", help="the domain added by add-data")
    parser.add_argument("--heldout", default="system", help="a domain left out of both runs")
    parser.add_argument("--clusters", type=int, default=4, help="K of the run before the new domain comes")
    parser.add_argument("--tokens-per-expert", type=int, default=24_576)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=None, help="base model (default: the shipped tiny Llama)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(args.out / "experiment.log"), logging.StreamHandler(sys.stderr)])
    old, new, union = write_corpora(Path(args.data), args.out / "corpora", args.new, args.heldout)
    grown, rebuilt = args.out / "grown", args.out / "rebuilt"
    base = ["--base", args.base] if args.base else []
    expert = ["--expert.tokens_per_expert", str(args.tokens_per_expert), "--expert.seed", str(args.seed)]
    cluster = ["--clustering.embedder", "minilm", "--clustering.seed", str(args.seed)]
    upcycle(args.out, "introvert", "cluster", "--data", str(old), *base, "--out", str(grown),
            "--clustering.clusters", str(args.clusters), *cluster)
    upcycle(args.out, "introvert", "train-experts", str(grown), *expert)
    upcycle(args.out, "introvert", "add-data", str(grown), "--data", str(new))
    k_final = read_meta(grown)["clusters"]["k"]
    upcycle(args.out, "introvert", "cluster", "--data", str(union), *base, "--out", str(rebuilt),
            "--clustering.clusters", str(k_final), *cluster)
    upcycle(args.out, "introvert", "train-experts", str(rebuilt), *expert)
    upcycle(args.out, "introvert", "evaluate", str(grown), "--eval.reference_run", str(rebuilt),
            "--eval.baselines", "false", "--eval.seed", str(args.seed))
    summary = summarise(grown, rebuilt)
    from upcycle.io import write_json

    write_json(args.out / "summary.json", summary)
    print(json.dumps(summary, indent=1))


def write_corpora(data: Path, root: Path, new: str, heldout: str) -> tuple[Path, Path, Path]:
    """The old domains, the new one and their union, each a .jsonl file of its documents."""
    from upcycle.data import load_documents
    from upcycle.io import atomic_write_text

    docs = load_documents(str(data))
    domain = lambda doc: doc.id.split("/")[0]  # noqa: E731 - a directory corpus names documents domain/file
    sizes = Counter(domain(d) for d in docs)
    if new not in sizes or heldout not in sizes or new == heldout or len(sizes) < 3:
        sys.exit(f"--new {new} / --heldout {heldout}: choose two different domains of {sorted(sizes)}, leaving at "
                 "least one more; build the corpus with `make real`")
    views = {"old": [d for d in docs if domain(d) not in (new, heldout)], "new": [d for d in docs if domain(d) == new]}
    views["union"] = views["old"] + views["new"]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, chosen in views.items():
        paths.append(root / f"{name}.jsonl")
        atomic_write_text(paths[-1], "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in chosen))
    log.info("old = %s, new = %s (%d documents)", {d: n for d, n in sizes.items() if d not in (new, heldout)}, new,
             sizes[new])
    return paths[0], paths[1], paths[2]


def upcycle(out: Path, *argv: str) -> None:
    """One pipeline command, its output appended to OUT/experiment.log; stops the experiment if it fails."""
    start = time.perf_counter()
    log.info("upcycle %s", " ".join(argv))
    with open(out / "experiment.log", "a") as sink:
        code = subprocess.call([sys.executable, "-m", "upcycle.cli", *argv], stdout=sink, stderr=sink)
    if code != 0:
        sys.exit(f"`upcycle {' '.join(argv)}` failed (exit {code}); see {out}/experiment.log")
    log.info("finished in %.0f s", time.perf_counter() - start)


def read_meta(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def trained_tokens(run: Path) -> int:
    """Training tokens of every expert the run holds, as their train.json files record them."""
    return sum(json.loads(p.read_text())["tokens"] for p in sorted((run / "experts").glob("*/train.json")))


def summarise(grown: Path, rebuilt: Path) -> dict:
    """Tokens each way, and the routed perplexities of both runs on the grown run's test documents."""
    results = json.loads((grown / "eval" / "results.json").read_text())
    generations = read_meta(grown).get("generations", [])
    added = sum(g.get("tokens", 0) for g in generations[1:])
    first = [g for g in generations if g.get("generation") == 0]
    paired = next(p for p in results["paired"] if (p["method"], p["reference"]) == ("routed", "reference"))
    rebuild = trained_tokens(rebuilt)
    return {
        "clusters": {"before": first[0].get("clusters") if first else None, "grown": results["k"],
                     "rebuilt": read_meta(rebuilt)["clusters"]["k"]},
        "tokens": {"add_data": added, "rebuild": rebuild, "add_data_over_rebuild": round(added / rebuild, 3)},
        "add_data": generations[1:],
        "test_documents": results["documents"],
        "perplexity": {name: results["methods"][name]["perplexity"] for name in ("base", "routed", "reference")},
        "grown_vs_rebuilt_pct": {"delta": paired["delta_pct"], "ci95": paired["ci95_pct"]},
    }


if __name__ == "__main__":
    main()
