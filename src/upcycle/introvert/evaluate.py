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
from dataclasses import asdict, dataclass

import numpy as np
import torch

from upcycle.data import Document, SplitConfig, load_documents, split_documents
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
from upcycle.introvert.config import EvalConfig, RoutingConfig
from upcycle.introvert.data import load_run_data
from upcycle.introvert.evaluate_routing import (
    PromptRoutes,
    choose_temperatures,
    guarded_members,
    nearest_distances,
    wanted_experts,
)
from upcycle.introvert.model import IntrovertExperts, mix_documents
from upcycle.introvert.router import Guard, calibrate_guard, load_sequence_router
from upcycle.introvert.run import Run, expert_id
from upcycle.io import ensure_writable_dir, read_json, write_json
from upcycle.models.base import load_base
from upcycle.serving.router import BASE

log = logging.getLogger(__name__)
RESULTS_SCHEMA = 1
# (method, reference) pairs reported with paired bootstrap intervals
PAIRED_COMPARISONS = [("routed", "base"), ("routed", "lora-all"), ("routed", "lora-wide"), ("routed", "full"),
                      ("routed", "random"), ("full", "base"), ("lora-all", "base")]
# The guard's comparisons: in domain it should change nothing; out of domain it should never lose to the base.
GUARD_TEST_COMPARISONS = [("guarded-base", "routed"), ("guarded-mixture", "routed")]
GUARD_HELDOUT_COMPARISONS = [("routed", "base"), ("guarded-base", "base"), ("guarded-mixture", "base"),
                             ("guarded-base", "routed")]


def summarise(nll: np.ndarray, count: np.ndarray, clusters: np.ndarray | None, k: int, bootstrap: int,
              seed: int) -> dict:
    """Token-weighted perplexity overall and per cluster (without `clusters`: overall only), with a bootstrap CI over
    documents."""
    summary = {"perplexity": token_perplexity(nll, count),
               "ci95": bootstrap_ci(lambda idx: token_perplexity(nll[idx], count[idx]), len(nll), bootstrap, seed),
               "tokens": int(count.sum())}
    if clusters is not None:
        summary["per_cluster"] = {str(c): token_perplexity(nll[clusters == c], count[clusters == c])
                                  if (clusters == c).any() else None for c in range(k)}
    return summary


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
    top_ks = config.top_ks_for(k)
    baselines = _trained_baselines(run, k, config)
    data = load_run_data(run)
    docs = data.docs(config.split)
    if not docs:
        raise UserError(f"the {config.split} split is empty; use a larger corpus")
    heldout = _heldout_documents(run, config)  # a bad path fails before anything is scored
    reference = _reference_run(run, config)  # as does a reference run that cannot be compared
    base_model, tok = load_base(run.base)
    ids = _token_ids(tok, docs, config)
    own = np.array([data.own_cluster[config.split][d.id] for d in docs])

    # Baselines first: they copy the clean base, before IntrovertExperts wraps it with the experts' adapters.
    nll = {name: document_nll(load_baseline(run, name, base_model), ids, tok.pad_token_id,
                              batch_size=config.batch_size)[0] for name in baselines}
    experts = IntrovertExperts(run, base_model, tok, load_sequence_router(run), max_loaded=k + 1)
    validation = PromptRoutes(experts.router, [d.text[:config.route_chars] for d in data.docs("validation")])
    tuned = sorted(set(top_ks) | ({min(2, k)} if config.guard_percentile is not None else set()))  # k=2: the guard's
    temperatures, mixture = choose_temperatures(experts, _token_ids(tok, data.docs("validation"), config), validation,
                                                tuned, config.temperatures, config.batch_size)
    guard = _guard(run, config, validation, experts)
    prompts = PromptRoutes(experts.router, [d.text[:config.route_chars] for d in docs])
    test = _score_split(experts, ids, own, prompts, top_ks, temperatures, guard, config)
    nll |= test.nll
    if reference is not None:
        nll["reference"] = _score_reference(reference, docs, ids, config)
    results = {
        "schema": RESULTS_SCHEMA,
        "split": config.split,
        "config": asdict(config),
        "k": k,
        "documents": len(docs),
        "cluster_sizes": {config.split: np.bincount(own, minlength=k).tolist()},
        "methods": {name: summarise(values, test.counts, own, k, config.bootstrap, config.seed)
                    for name, values in nll.items()},
        "routing": test.routing,
        "mixture": mixture | {"top_ks": top_ks, "methods": {str(n): _mixture_name(n) for n in top_ks}},
        "training": _training_summary(run, expert_ids, baselines),
        "paired": [paired_delta(nll, test.counts, m, ref, config.bootstrap, config.seed)
                   for m, ref in _paired_comparisons(top_ks) if m in nll and ref in nll],
        **({"reference_run": config.reference_run} if config.reference_run is not None else {}),
        "cost": measure_cost(experts, max((d.text for d in docs), key=len), config.route_chars),
    }
    if guard is not None:
        out_temperature = temperatures.get(2, config.temperatures[0])
        results["guard"] = {"percentile": config.guard_percentile, "threshold": guard.threshold,
                            "out_of_domain_temperature": out_temperature,
                            "validation_prompts_flagged": _flagged_share(validation, guard),
                            config.split: _guard_split(test.guarded | {"routed": nll["routed"]}, test.counts,
                                                       nearest_distances(prompts), guard, GUARD_TEST_COMPARISONS,
                                                       config)}
        if heldout is not None:
            results["guard"]["heldout"] = _score_heldout(experts, heldout, guard, out_temperature, config)
    write_json(run.eval_dir / "results.json", results)
    return results


@dataclass
class _SplitScores:
    """Every method's per-document NLL on one split, its tokens per document, and how its prompts were routed."""

    nll: dict[str, np.ndarray]
    counts: np.ndarray
    guarded: dict[str, np.ndarray]
    routing: dict


def _score_split(experts: IntrovertExperts, ids: list, own: np.ndarray, prompts: PromptRoutes, top_ks: list[int],
                 temperatures: dict[int, float], guard: Guard | None, config: EvalConfig) -> _SplitScores:
    """Score each document under every expert a method needs, once each (one adapter swap per expert), and derive
    the methods: base, routed (top-1), oracle, random, best, routed-top{k} mixtures and the guarded routes."""
    k = experts.router.centroid_router.num_experts
    routed = np.array([route.clusters[0] for route in prompts.top1])
    rng = random.Random(config.seed)
    random_choice = np.array([rng.randrange(k) for _ in ids])
    every = k <= config.best_expert_max_k
    mixtures = {_mixture_name(n): prompts.members(n, temperatures.get(n, 1.0)) for n in top_ks if n > 1}
    guarded = guarded_members(prompts, guard, temperatures.get(2, config.temperatures[0])) if guard else {}
    singles = [{BASE, *(expert_id(c) for c in (range(k) if every else (own[i], routed[i], random_choice[i])))}
               for i in range(len(ids))]
    scored = experts.token_log_probs(ids, wanted_experts(*mixtures.values(), *guarded.values(), extra=singles),
                                     batch_size=config.batch_size)
    counts = np.array([len(lp[BASE]) for lp in scored], dtype=np.int64)
    expert_nll = np.array([_nll(scored, expert_id(c)) for c in range(k)])  # [K, N], NaN where not scored
    pick = lambda choice: expert_nll[choice, np.arange(len(ids))]  # noqa: E731
    nll = {"base": _nll(scored, BASE), "routed": pick(routed), "oracle": pick(own), "random": pick(random_choice)}
    if every:
        nll["best"] = np.nanmin(expert_nll / np.maximum(counts, 1), axis=0) * counts
    nll |= {name: mix_documents(scored, members)[0] for name, members in mixtures.items()}
    routing = {"accuracy": float((routed == own).mean()), "documents": len(ids),
               "seconds_per_document": prompts.seconds / len(ids),
               "best_expert_accuracy": (float((np.nanargmin(expert_nll / np.maximum(counts, 1), axis=0)
                                               == routed).mean()) if every else None)}
    return _SplitScores(nll, counts, {name: mix_documents(scored, m)[0] for name, m in guarded.items()}, routing)


def _score_heldout(experts: IntrovertExperts, docs: list[Document], guard: Guard, temperature: float,
                   config: EvalConfig) -> dict:
    """Base, routed top-1 and the guarded routes on documents of a domain no cluster was built from."""
    prompts = PromptRoutes(experts.router, [d.text[:config.route_chars] for d in docs])
    members = {"routed": prompts.members(1), **guarded_members(prompts, guard, temperature)}
    scored = experts.token_log_probs(_token_ids(experts.tokenizer, docs, config),
                                     wanted_experts(*members.values(), extra=[{BASE}] * len(docs)),
                                     batch_size=config.batch_size)
    nll = {"base": _nll(scored, BASE)} | {name: mix_documents(scored, m)[0] for name, m in members.items()}
    counts = np.array([len(lp[BASE]) for lp in scored], dtype=np.int64)
    return {"data": config.heldout_data,
            **_guard_split(nll, counts, nearest_distances(prompts), guard, GUARD_HELDOUT_COMPARISONS, config)}


def _guard_split(nll: dict[str, np.ndarray], counts: np.ndarray, distances: np.ndarray, guard: Guard,
                 comparisons: list[tuple[str, str]], config: EvalConfig) -> dict:
    """How many documents the guard flags, each method's perplexity and the paired comparisons."""
    flagged = distances > guard.threshold
    return {"documents": len(counts), "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
            "methods": {name: summarise(values, counts, None, 0, config.bootstrap, config.seed)
                        for name, values in nll.items()},
            "paired": [paired_delta(nll, counts, m, ref, config.bootstrap, config.seed) for m, ref in comparisons]}


def _guard(run: Run, config: EvalConfig, validation: PromptRoutes, experts: IntrovertExperts) -> Guard | None:
    """The guard scored (None when --eval.guard_percentile is null), calibrated on the validation split's prompts
    (their first `route_chars` characters, as the test documents are routed)."""
    if config.guard_percentile is None:
        if config.heldout_data is not None:
            raise UserError("--eval.heldout_data scores the out-of-domain guard; give --eval.guard_percentile too")
        return None
    if not validation.prompts:
        raise UserError(f"{run.path}: the guard is calibrated on the validation split, which is empty in this run; "
                        "give --eval.guard_percentile null")
    return calibrate_guard(run, RoutingConfig(guard_percentile=config.guard_percentile,
                                              guard_prompt_chars=config.route_chars),
                           validation.centroid_router, experts.router.embedder)


def _flagged_share(prompts: PromptRoutes, guard: Guard) -> float | None:
    """Share of these prompts beyond the threshold (on the validation prompts the guard was calibrated on: about
    100 - guard_percentile %)."""
    return float((nearest_distances(prompts) > guard.threshold).mean()) if prompts.prompts else None


def _heldout_documents(run: Run, config: EvalConfig) -> list[Document] | None:
    """The `split` documents of --eval.heldout_data (split by the run's fractions), or None without one."""
    if config.heldout_data is None:
        return None
    try:
        docs = load_documents(config.heldout_data, text_field=run.meta.get("text_field", "text"))
    except UserError as error:  # load_documents names --data, the flag of the cluster step
        raise UserError(str(error).replace("--data", "--eval.heldout_data", 1)) from None
    split = split_documents(docs, SplitConfig(**run.meta.get("splits", {})))[config.split]
    if not split:
        raise UserError(f"--eval.heldout_data {config.heldout_data}: its {config.split} split is empty; use a larger "
                        "corpus")
    return split


def _token_ids(tokenizer, docs: list[Document], config: EvalConfig) -> list[np.ndarray]:
    return tokenize(tokenizer, [d.text for d in docs], add_eos=False, max_tokens=config.max_tokens_per_doc)


def _nll(scored: list[dict[str, np.ndarray]], expert: str) -> np.ndarray:
    """[N] NLL sum of each document under `expert` (NaN where it was not scored)."""
    return np.array([-lp[expert].sum(dtype=np.float64) if expert in lp else np.nan for lp in scored])


def _mixture_name(top_k: int) -> str:
    return "routed" if top_k == 1 else f"routed-top{top_k}"


def _paired_comparisons(top_ks: list[int]) -> list[tuple[str, str]]:
    """PAIRED_COMPARISONS, each top-k mixture against the base, the baselines and top-1 routing, and routing against
    a reference run's routing."""
    mixtures = [_mixture_name(n) for n in top_ks if n > 1]
    return PAIRED_COMPARISONS + [(m, ref) for m in mixtures for ref in ("base", "lora-all", "lora-wide", "full",
                                                                         "routed")] + [("routed", "reference")]


def _reference_run(run: Run, config: EvalConfig) -> Run | None:
    """--eval.reference_run opened and checked comparable (same base, same splits, experts trained), or None."""
    if config.reference_run is None:
        return None
    other = Run.open(config.reference_run)
    if other.base != run.base:
        raise UserError(f"--eval.reference_run {other.path} was built on {other.base}, this run on {run.base}; "
                        "compare runs of the same base")
    if other.meta.get("splits") != run.meta.get("splits"):
        raise UserError(f"--eval.reference_run {other.path} splits its documents differently "
                        f"({other.meta.get('splits')} against {run.meta.get('splits')}): these test documents may "
                        "have trained its experts")
    check_experts_trained(other)
    return other


def _score_reference(other: Run, docs: list[Document], ids: list[np.ndarray], config: EvalConfig) -> np.ndarray:
    """Per-document NLL of the reference run's own routed top-1 on these documents (its router, its experts)."""
    base_model, tokenizer = load_base(other.base)
    experts = IntrovertExperts(other, base_model, tokenizer, load_sequence_router(other), max_loaded=2)
    members = PromptRoutes(experts.router, [d.text[:config.route_chars] for d in docs]).members(1)
    scored = experts.token_log_probs(ids, wanted_experts(members), batch_size=config.batch_size)
    return mix_documents(scored, members)[0]


def _trained_baselines(run: Run, k: int, config: EvalConfig) -> list[str]:
    """The baselines to score; a UserError naming the command to run when one of them is not trained yet."""
    baselines = baseline_names(k) if config.baselines else []
    untrained = [name for name in baselines if not is_trained(run, name)]
    if untrained:
        raise UserError(f"{run.path}: baselines not trained ({', '.join(untrained)}); run `upcycle introvert "
                        f"train-baselines {run.path}` first, or evaluate without them (--eval.baselines false)")
    return baselines


def _training_summary(run: Run, expert_ids: list[str], baselines: list[str]) -> dict:
    """Tokens, seconds and tokens/s of the experts (summed) and of each baseline, from their train.json."""
    experts = [read_json(run.expert_dir(e) / "train.json") for e in expert_ids]
    tokens, seconds = sum(t["tokens"] for t in experts), sum(t["seconds"] for t in experts)
    summary = {"experts": {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}}
    for name in baselines:
        meta = read_json(baseline_dir(run, name) / "train.json")
        summary[name] = {key: meta[key] for key in ("tokens", "seconds", "tokens_per_second")}
    return summary
