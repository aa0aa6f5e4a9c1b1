"""The number-of-clusters ablation: same data, same total training tokens, K in a list, several seeds.

Every (K, seed) is its own run under RUN/ablation/k<K>-s<seed>/ sharing the parent's embeddings; experts get
total_tokens / K tokens each so that every K costs the same training compute. Resumable like any run.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from upcycle.eval.stats import mean_ci
from upcycle.introvert.clustering.corpus import refit_clusters
from upcycle.introvert.config import ClusterConfig, EvalConfig, ExpertConfig
from upcycle.introvert.evaluate import evaluate
from upcycle.introvert.experts import train_experts
from upcycle.introvert.run import Run
from upcycle.io import read_json, write_json

log = logging.getLogger(__name__)


def _mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of a 95% t-interval (0 with one seed), in ablation.json's keys."""
    stats = mean_ci(values)
    return {"mean": stats["mean"], "ci95_halfwidth": stats["ci95"] or 0.0, "values": stats["values"]}


def ablate_clusters(run: Run | str, ks: list[int], seeds: list[int], total_tokens: int, expert_config: ExpertConfig,
                    eval_config: EvalConfig, executor: str = "local", workers: int = 1) -> dict:
    """Train and score routed/oracle experts for each K and seed; write RUN/eval/ablation.json."""
    parent = Run.of(run)
    base_config = ClusterConfig(**parent.meta["clusters"]["config"])
    by_k: dict[str, dict] = {}
    base_ppl = None
    for k in ks:
        rows = []
        for seed in seeds:
            out = parent.path / "ablation" / f"k{k}-s{seed}"
            child = Run(out) if (out / "run.json").is_file() else refit_clusters(
                parent, out, replace(base_config, clusters=k, seed=seed))
            per_expert = max(1, total_tokens // k)
            train_experts(child, replace(expert_config, tokens_per_expert=per_expert, seed=seed),
                          executor=executor, workers=workers)
            results_path = child.eval_dir / "results.json"
            results = read_json(results_path) if results_path.is_file() else evaluate(
                child, replace(eval_config, baselines=False, best_expert_max_k=0, seed=seed))
            base_ppl = results["methods"]["base"]["perplexity"]
            rows.append(results)
        by_k[str(k)] = {"seeds": len(seeds),
                        "routed": _mean_ci([r["methods"]["routed"]["perplexity"] for r in rows]),
                        "oracle": _mean_ci([r["methods"]["oracle"]["perplexity"] for r in rows]),
                        "random": _mean_ci([r["methods"]["random"]["perplexity"] for r in rows]),
                        "routing_accuracy": _mean_ci([r["routing"]["accuracy"] for r in rows])}
    ablation = {"split": eval_config.split, "total_tokens": total_tokens, "seeds": seeds,
                "base_perplexity": base_ppl, "by_k": by_k}
    write_json(parent.eval_dir / "ablation.json", ablation)
    return ablation
