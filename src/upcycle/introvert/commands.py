"""CLI commands of the introvert-experts (MoIN) pipeline. Each signature is its command line."""

from __future__ import annotations

import logging
import sys
import time

from upcycle.data.splits import SplitConfig
from upcycle.errors import UserError
from upcycle.introvert.config import AddConfig, BaselineConfig, ClusterConfig, EvalConfig, ExpertConfig

log = logging.getLogger(__name__)


def _command_line() -> str:
    return "upcycle " + " ".join(sys.argv[1:])


def cluster(out: str = "runs/demo", data: str = "stdlib", base: str | None = None, text_field: str = "text",
            clustering: ClusterConfig = ClusterConfig(), splits: SplitConfig = SplitConfig()) -> None:
    """Embed the corpus, fit K cluster centroids on its training split, and start a run directory.

    Args:
        out: Run directory to create (or reuse when the settings match).
        data: Corpus: a folder of text files, a .txt/.jsonl/.parquet file, 'hf:NAME[:CONFIG][@SPLIT]', or 'stdlib'.
        base: Base causal LM: a Hugging Face directory or hub id (default: the shipped tiny Llama).
        text_field: Column holding the text in .jsonl/.parquet/hub data.
        clustering: Embedding and k-means settings (K, embedder, metric...).
        splits: Held-out fractions (the split is by a hash of each document's text).
    """
    from upcycle.introvert.clustering.corpus import cluster_corpus
    from upcycle.models.base import resolve_base

    run = cluster_corpus(out, data, resolve_base(base), clustering, splits, text_field, command=_command_line())
    sizes = run.meta["clusters"]["sizes"]
    print(f"{run.path}: {len(sizes)} clusters, training documents per cluster {sizes}; summary in "
          f"{run.clusters_dir / 'summary.md'}")


def train_experts(run: str, expert: ExpertConfig = ExpertConfig(), executor: str = "local", workers: int = 1,
                  address: str | None = None) -> None:
    """Train one LoRA expert per cluster on the frozen base; finished experts are skipped, so reruns resume.

    Args:
        run: Run directory made by `upcycle introvert cluster`.
        expert: Expert training settings (LoRA shape, tokens per expert, learning rate...).
        executor: local (this process), process (local worker processes) or ray (a Ray cluster).
        workers: Worker processes for --executor process.
        address: Ray cluster address for --executor ray (default: start a local Ray).
    """
    from upcycle.introvert.experts import train_experts as train
    from upcycle.introvert.run import Run

    start = time.perf_counter()
    results = train(run, expert, executor=executor, workers=workers, address=address)
    Run(run).record_command(_command_line())
    trained = [r for r in results if not r.get("skipped")]
    tokens = sum(r["tokens"] for r in trained)
    print(f"{len(trained)} experts trained, {len(results) - len(trained)} already done; {tokens} tokens in "
          f"{time.perf_counter() - start:.0f} s ({tokens / max(time.perf_counter() - start, 1e-9):.0f} tokens/s)")


def add_data(run: str, data: str = "", base: str | None = None, add: AddConfig = AddConfig()) -> None:
    """Grow a trained run with new documents: those near a cluster join it, the rest form new clusters; only new
    experts and those of clusters that grew are trained. Rerun after an interruption to finish; adding the same
    content twice does nothing.

    Args:
        run: Run directory with trained experts.
        data: The new corpus, required (as for `upcycle introvert cluster`; read with the run's --text_field).
        base: Only checked: it must be the run's base (the default is the run's own).
        add: Which documents join, how many new clusters, which experts are continued.
    """
    from upcycle.introvert.growth import add_data as grow
    from upcycle.introvert.run import Run

    if not data:
        raise UserError("--data is required: the corpus to add to the run")
    opened = Run.open(run)
    record = grow(opened, data, add, base)
    if record.get("already"):
        print(f"{run}: this content was already added as generation {record['generation']} ({record['data']}); "
              "nothing to do")
        return
    opened.record_command(_command_line())
    print(f"{run}: generation {record['generation']}: {sum(record['documents'].values())} new documents, "
          f"{record['joined']} joined existing clusters, {record['new_clusters']} new clusters; experts trained "
          f"{record['experts_trained']}, {record['tokens']} tokens in {record['seconds']:.0f} s")


def train_baselines(run: str, baseline: BaselineConfig = BaselineConfig()) -> None:
    """Train the comparisons `upcycle introvert evaluate` scores (lora-all, lora-wide, full) on as many tokens as
    all the experts together; finished ones are skipped, so reruns resume.

    Args:
        run: Run directory with trained experts.
        baseline: Baseline settings (their learning rates; the rest is copied from the experts' settings).
    """
    from upcycle.introvert.baselines import train_baselines as train
    from upcycle.introvert.run import Run

    start = time.perf_counter()
    opened = Run.open(run)
    results = train(opened, baseline)
    opened.record_command(_command_line())
    trained = [name for name, r in results.items() if not r["skipped"]]
    print(f"{len(trained)} baselines trained ({', '.join(trained) or 'none'}), {len(results) - len(trained)} already "
          f"done, in {time.perf_counter() - start:.0f} s")


def evaluate(run: str, eval: EvalConfig = EvalConfig()) -> None:  # noqa: A002 - the CLI group is --eval.*
    """Score routed experts against base, oracle, random routing and the matched baselines; write the report.

    Args:
        run: Run directory with trained experts.
        eval: Evaluation settings.
    """
    from upcycle.introvert.evaluate import evaluate as run_evaluation
    from upcycle.introvert.report import write_report
    from upcycle.introvert.run import Run

    results = run_evaluation(run, eval)
    Run(run).record_command(_command_line())
    print_results(results)
    print(f"report: {write_report(run)}")


def ablate(run: str, clusters: list[int] = [1, 2, 4, 8, 16], seeds: list[int] = [0],  # noqa: B006
           total_tokens: int | None = None, eval: EvalConfig = EvalConfig(),  # noqa: A002
           expert: ExpertConfig = ExpertConfig(), executor: str = "local", workers: int = 1) -> None:
    """Number-of-clusters ablation at equal total training tokens, with seeds and 95% confidence intervals.

    Args:
        run: A run made by `upcycle introvert cluster` (its embeddings are reused).
        clusters: Values of K to try.
        seeds: Seeds per K (k-means and expert training).
        total_tokens: Training tokens shared by all experts of one K (default: K_run x tokens per expert).
        eval: Evaluation settings.
        expert: Expert settings (tokens_per_expert is replaced by total_tokens / K).
        executor: local, process or ray.
        workers: Worker processes for --executor process.
    """
    from upcycle.introvert.ablation import ablate_clusters
    from upcycle.introvert.report import write_report
    from upcycle.introvert.run import Run

    if any(k < 1 for k in clusters):  # ClusterConfig refuses it too, but names the flag of `introvert cluster`
        raise UserError(f"--clusters must be >= 1, got {min(clusters)}")
    meta = Run.open(run).meta
    total = total_tokens or meta["clusters"]["k"] * expert.tokens_per_expert
    ablation = ablate_clusters(run, clusters, seeds, total, expert, eval, executor, workers)
    for k, entry in ablation["by_k"].items():
        print(f"K={k:>4}: routed {entry['routed']['mean']:.2f} ± {entry['routed']['ci95_halfwidth']:.2f}, "
              f"oracle {entry['oracle']['mean']:.2f}, routing accuracy {100 * entry['routing_accuracy']['mean']:.1f}%")
    if (Run(run).eval_dir / "results.json").is_file():
        print(f"report: {write_report(run)}")


def report(run: str) -> None:
    """Rewrite RUN/report.md and its plots from RUN/eval/*.json.

    Args:
        run: Run directory with eval/results.json.
    """
    from upcycle.introvert.report import write_report

    print(write_report(run))


def generate(run: str, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, expert: str = "auto") -> None:
    """Route a prompt to its expert, generate a continuation, and say which expert answered.

    Args:
        run: Run directory with trained experts.
        prompt: The text to continue.
        max_new_tokens: Tokens to generate.
        temperature: 0 for greedy decoding.
        expert: 'auto' (route), 'base' (no adapter) or an expert id such as expert-00003.
    """
    from upcycle.introvert.model import IntrovertExperts

    generation = IntrovertExperts.from_run(run).generate(prompt, max_new_tokens, temperature, expert=expert)
    print(f"[{generation.expert or 'base'}] {prompt}{generation.text}")


def demo(out: str = "runs/demo", data: str = "stdlib", base: str | None = None,
         clustering: ClusterConfig = ClusterConfig(), expert: ExpertConfig = ExpertConfig(),
         eval: EvalConfig = EvalConfig(), executor: str = "local", workers: int = 1) -> None:  # noqa: A002
    """The whole MoIN pipeline: cluster, train the experts and the baselines, evaluate, and write the report.

    By default on the embedded defaults (stdlib corpus, shipped tiny Llama). Resumable: rerun to continue.

    The real-model demo: `upcycle demo --config recipes/introvert/smollm2-demo.yaml` (after `make real`).

    Args:
        out: Run directory.
        data: Corpus (as for `upcycle introvert cluster`).
        base: Base causal LM (as for `upcycle introvert cluster`; e.g. smollm2-135m).
        clustering: Embedding and k-means settings (K, embedder, metric...).
        expert: Expert training settings.
        eval: Evaluation settings.
        executor: Where the experts train: local, process or ray (as for `upcycle introvert train-experts`).
        workers: Worker processes for --executor process.
    """
    start = time.perf_counter()
    cluster(out=out, data=data, base=base, clustering=clustering)
    train_experts(out, expert, executor=executor, workers=workers)
    if eval.baselines:
        train_baselines(out, eval.baseline)
    evaluate(out, eval)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


def print_results(results: dict) -> None:
    """The main results table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    from upcycle.introvert.report import results_table

    header, rows = results_table(results)
    table = Table(title=f"K={results['k']}, {results['documents']} {results['split']} documents")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)
    print(f"routing accuracy {100 * results['routing']['accuracy']:.1f}%")
