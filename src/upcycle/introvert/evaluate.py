"""`upcycle introvert evaluate`: held-out perplexity of routed experts against controls and matched baselines.

Methods scored on the test split (every number comes from the same documents and token budget):
- base: the frozen base alone.
- routed: each document goes to the expert its *prompt* (first `route_chars` characters) is routed to, which is
  what a server sees; no information from later in the document is used to pick the expert.
- oracle: each document goes to its own cluster (from its full-text embedding, as the training documents were).
- best: the expert with the lowest loss on that document (an upper bound for any sequence router; K <= 32 only).
- random: a seeded uniformly random expert per document (control).
- lora-all, lora-wide, full: the baselines of `upcycle.introvert.baselines`, trained on the experts' total tokens
  by `upcycle introvert train-baselines`.

Evaluation only reads the run (experts, baselines, data) and writes RUN/eval/results.json; it trains nothing.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict

import numpy as np
import torch

from upcycle.data.packing import token_ids, tokenize
from upcycle.errors import UserError
from upcycle.eval.perplexity import document_nll
from upcycle.eval.stats import bootstrap_ci, token_perplexity
from upcycle.introvert.baselines import (
    WRITABLE_HINT,
    baseline_dir,
    baseline_names,
    check_experts_trained,
    is_trained,
    load_baseline,
)
from upcycle.introvert.config import EvalConfig
from upcycle.introvert.data import load_run_data
from upcycle.introvert.model import IntrovertExperts
from upcycle.introvert.router import load_sequence_router
from upcycle.introvert.run import Run, cluster_of, expert_id
from upcycle.io import ensure_writable_dir, read_json, write_json
from upcycle.models.base import load_base

log = logging.getLogger(__name__)
RESULTS_SCHEMA = 1
# (method, reference) pairs reported with paired bootstrap intervals
PAIRED_COMPARISONS = [("routed", "base"), ("routed", "lora-all"), ("routed", "lora-wide"), ("routed", "full"),
                      ("routed", "random"), ("full", "base"), ("lora-all", "base")]


def summarise(nll: np.ndarray, count: np.ndarray, clusters: np.ndarray, k: int, bootstrap: int,
              seed: int) -> dict:
    """Token-weighted perplexity overall and per cluster, with a bootstrap CI over documents."""
    return {"perplexity": token_perplexity(nll, count),
            "ci95": bootstrap_ci(lambda idx: token_perplexity(nll[idx], count[idx]), len(nll), bootstrap, seed),
            "per_cluster": {str(c): token_perplexity(nll[clusters == c], count[clusters == c])
                            if (clusters == c).any() else None
                            for c in range(k)},
            "tokens": int(count.sum())}


def paired_delta(nll: dict[str, np.ndarray], count: np.ndarray, method: str, reference: str, bootstrap: int,
                 seed: int) -> dict:
    """Relative perplexity change of `method` vs `reference` with a paired bootstrap CI (same documents resampled).

    Pairing removes the document-to-document spread that both share, which dominates the per-method intervals.
    """
    def ratio(idx: np.ndarray) -> float:
        return token_perplexity(nll[method][idx], count[idx]) / token_perplexity(nll[reference][idx], count[idx]) - 1

    low, high = bootstrap_ci(ratio, len(count), bootstrap, seed)
    return {"method": method, "reference": reference, "delta_pct": 100 * ratio(np.arange(len(count))),
            "ci95_pct": [100 * low, 100 * high]}


@torch.no_grad()
def measure_cost(experts: IntrovertExperts, text: str, route_chars: int, repeats: int = 5) -> dict:
    """FLOPs per token and measured latency per token: base vs routed (routing + unmerged LoRA), batch 1."""
    ids = torch.from_numpy(token_ids(experts.tokenizer, text, max_tokens=256).astype(np.int64))[None]  # [1, T]
    ids = ids.to(experts.device)
    chosen = experts.route([text[:route_chars]])[0]

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    with experts.using(None) as model:
        base_s = timed(lambda: model(input_ids=ids))
    with experts.using(chosen) as model:
        expert_s = timed(lambda: model(input_ids=ids))
    route_s = timed(lambda: experts.route([text[:route_chars]]))
    base_params = sum(p.numel() for n, p in experts.base_model.named_parameters() if "lora_" not in n)
    lora_params = experts.adapter_parameters(chosen)
    n = ids.shape[1]
    return {"tokens": n, "base_ms_per_token": 1e3 * base_s / n, "routed_ms_per_token": 1e3 * expert_s / n,
            "routing_ms_per_request": 1e3 * route_s,
            "base_flops_per_token": 2 * base_params, "routed_flops_per_token": 2 * (base_params + lora_params),
            "adapter_parameters": lora_params, "base_parameters": base_params,
            "note": "FLOPs = 2 x parameters touched per token (matmuls; attention scores excluded); latency is one "
                    "forward of the block, batch 1, unmerged LoRA; routing embeds the prompt and looks up centroids"}


def evaluate(run: Run | str, config: EvalConfig = EvalConfig()) -> dict:
    """Score every method on the held-out split and write RUN/eval/results.json. Returns the results."""
    run = Run.of(run)
    with run.lock("evaluate"):
        # Checked before any scoring: a read-only run used to fail only when the results were written.
        ensure_writable_dir(run.eval_dir, hint=WRITABLE_HINT)
        for path in run.remove_stale_temporaries():
            log.info("removed %s, left by an interrupted run", path)
        return _evaluate(run, config)


def _evaluate(run: Run, config: EvalConfig) -> dict:
    expert_ids = check_experts_trained(run)
    k = run.meta["clusters"]["k"]
    baselines = _trained_baselines(run, k, config)
    data = load_run_data(run)
    docs = data.docs(config.split)
    if not docs:
        raise UserError(f"the {config.split} split is empty; use a larger corpus")
    base_model, tok = load_base(run.base)
    ids = tokenize(tok, [d.text for d in docs], add_eos=False, max_tokens=config.max_tokens_per_doc)
    own = np.array([data.own_cluster[config.split][d.id] for d in docs])
    score = lambda model, blocks: document_nll(model, blocks, tok.pad_token_id, batch_size=config.batch_size)  # noqa: E731

    # Baselines first: they copy the clean base, before IntrovertExperts wraps it with the experts' adapters.
    nll = {name: score(load_baseline(run, name, base_model), ids)[0] for name in baselines}
    experts = IntrovertExperts(run, base_model, tok, load_sequence_router(run), max_loaded=k + 1)
    t0 = time.perf_counter()
    routed = np.array([cluster_of(e) for e in experts.route([d.text[: config.route_chars] for d in docs])])
    route_seconds = time.perf_counter() - t0
    rng = random.Random(config.seed)
    random_choice = np.array([rng.randrange(k) for _ in docs])
    with experts.using(None) as model:
        nll["base"], counts = score(model, ids)
    every = k <= config.best_expert_max_k
    expert_nll = _expert_nll(experts, ids, score, k, None if every else [own, routed, random_choice])
    pick = lambda choice: expert_nll[choice, np.arange(len(docs))]  # noqa: E731
    nll |= {"routed": pick(routed), "oracle": pick(own), "random": pick(random_choice)}
    if every:
        nll["best"] = np.nanmin(expert_nll / np.maximum(counts, 1), axis=0) * counts

    results = {
        "schema": RESULTS_SCHEMA,
        "split": config.split,
        "config": asdict(config),
        "k": k,
        "documents": len(docs),
        "cluster_sizes": {config.split: np.bincount(own, minlength=k).tolist()},
        "methods": {name: summarise(values, counts, own, k, config.bootstrap, config.seed)
                    for name, values in nll.items()},
        "routing": {"accuracy": float((routed == own).mean()), "documents": len(docs),
                    "seconds_per_document": route_seconds / len(docs),
                    "best_expert_accuracy": (float((np.nanargmin(expert_nll / np.maximum(counts, 1), axis=0)
                                                    == routed).mean()) if "best" in nll else None)},
        "training": _training_summary(run, expert_ids, baselines),
        "paired": [paired_delta(nll, counts, m, ref, config.bootstrap, config.seed)
                   for m, ref in PAIRED_COMPARISONS if m in nll and ref in nll],
        "cost": measure_cost(experts, max((d.text for d in docs), key=len), config.route_chars),
    }
    write_json(run.eval_dir / "results.json", results)
    return results


def _trained_baselines(run: Run, k: int, config: EvalConfig) -> list[str]:
    """The baselines to score; a UserError naming the command to run when one of them is not trained yet."""
    baselines = baseline_names(k) if config.baselines else []
    untrained = [name for name in baselines if not is_trained(run, name)]
    if untrained:
        raise UserError(f"{run.path}: baselines not trained ({', '.join(untrained)}); run `upcycle introvert "
                        f"train-baselines {run.path}` first, or evaluate without them (--eval.baselines false)")
    return baselines


def _expert_nll(experts: IntrovertExperts, ids: list, score, k: int, choices: list[np.ndarray] | None) -> np.ndarray:
    """[K, N] NLL of each document under the experts that `choices` (one expert index per document, for each method)
    give it, or under every expert when `choices` is None ('best' needs them all); NaN where not scored."""
    needed: dict[int, set[int]] = {c: set() for c in range(k)}
    for i in range(len(ids)):
        for c in (range(k) if choices is None else {int(choice[i]) for choice in choices}):
            needed[c].add(i)
    expert_nll = np.full((k, len(ids)), np.nan)
    for c in range(k):
        with experts.using(expert_id(c)) as model:
            chosen = sorted(needed[c])
            expert_nll[c, chosen], _ = score(model, [ids[i] for i in chosen])
    return expert_nll


def _training_summary(run: Run, expert_ids: list[str], baselines: list[str]) -> dict:
    """Tokens, seconds and tokens/s of the experts (summed) and of each baseline, from their train.json."""
    experts = [read_json(run.expert_dir(e) / "train.json") for e in expert_ids]
    tokens, seconds = sum(t["tokens"] for t in experts), sum(t["seconds"] for t in experts)
    summary = {"experts": {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}}
    for name in baselines:
        meta = read_json(baseline_dir(run, name) / "train.json")
        summary[name] = {key: meta[key] for key in ("tokens", "seconds", "tokens_per_second")}
    return summary
