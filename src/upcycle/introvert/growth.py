"""`upcycle introvert add-data RUN --data NEW`: grow a run with a new generation of documents, training only the
experts whose data changed.

1. NEW is read like the run's data (same text field), split with the run's split fractions and embedded with the
   run's fitted embedder. Ids get a `g<generation>/` prefix; texts already in the run are dropped.
2. A new training document within the out-of-domain guard's threshold of its nearest centroid joins that cluster.
   The rest form new clusters (FAISS k-means, `fit_kmeans`), about the size of the existing ones; too few of them
   form none and join their nearest cluster instead.
3. New clusters get new experts (the next expert indices). An existing cluster that grew by more than
   `grow_fraction` gets its expert *continued*: initialised from its current adapter and trained on its old and new
   documents together for `tokens_per_expert × (new tokens / all its tokens)` tokens. Continuing rather than
   retraining costs only the share of new data, and keeps what the adapter learned; mixing the old documents back in
   (replay) keeps it from forgetting them. Every other expert is left untouched, byte for byte.
4. Centroids: a grown cluster's centroid moves to the mean of its members, n·c + Σ new, over n + new (renormalised
   for cosine); new clusters' centroids are appended; the others are copied unchanged.

Readers never see a half-grown run. The plan (the complete new clusters/ directory and the experts to train) is
staged in `RUN/add-data.pending/`; experts are trained into experts/, each renamed into place when complete; the new
clusters/ and run.json then replace the old ones together (`atomic_directory` with a commit), and only from then on
does the router send requests to a new expert. An interrupted run resumes from the staged plan: a rerun with the
same NEW skips the experts this generation already trained (their train.json holds its content hash).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from upcycle.data import Document, SplitConfig
from upcycle.data.splits import SPLITS
from upcycle.errors import UserError
from upcycle.introvert.config import AddConfig, ExpertConfig
from upcycle.introvert.data import DOCUMENT_CLUSTERS, RunData, content_hash, generation_splits, merge_splits, run_splits
from upcycle.introvert.run import SPLIT_EMBEDDINGS as EMBEDDINGS
from upcycle.introvert.run import Run, expert_id
from upcycle.io import atomic_directory, read_json, write_json

log = logging.getLogger(__name__)

PENDING = "add-data.pending"  # RUN/add-data.pending/{plan.json, clusters/}: a generation staged, not yet committed
PLAN_FILE = "plan.json"


@dataclass
class Generation:
    """A generation of data being added: its documents and what the run already holds."""

    number: int
    data: str
    digest: str
    new: dict[str, list[Document]]
    """The new documents per split (texts already in the run dropped)."""
    old: dict[str, list[Document]]
    """The run's documents per split before this generation."""


def add_data(run: Run | str | Path, data: str, config: AddConfig, base: str | None = None) -> dict[str, Any]:
    """Add `data` to `run` (see the module docstring); returns the generation's record as run.json keeps it, with
    `"already": True` when this content was added before (nothing is done then)."""
    run = Run.of(run)
    with run.lock("add-data"):
        for path in run.remove_stale_temporaries():
            log.info("removed %s, left by an interrupted run", path)
        expert_config = check_growable(run, base)
        refuse_token_ids(data, run.meta.get("text_field", "text"))
        generations = recorded_generations(run)
        generation = load_generation(run, data, len(generations))
        known = next((g for g in generations if g["hash"] == generation.digest), None)
        if known is not None:
            shutil.rmtree(run.path / PENDING, ignore_errors=True)  # a committed generation's leftover stage
            return known | {"already": True}
        if not any(generation.new.values()):
            raise UserError(f"--data {data}: every document is already in {run.path}; nothing to add")
        start = time.perf_counter()
        plan = staged_plan(run, generation, config)
        trained = [train_changed_expert(run, generation, plan, item, expert_config) for item in plan["train"]]
        record = plan["record"] | {
            "experts_trained": [r["expert"] for r in trained], "tokens": sum(r["tokens"] for r in trained),
            "seconds": round(time.perf_counter() - start + sum(r.get("earlier_seconds", 0.0) for r in trained), 3),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        commit_generation(run, plan, generations + [record])
        return record


def check_growable(run: Run, base: str | None) -> ExpertConfig:
    """The run's expert settings, after refusing a run without trained experts or a --base other than the run's."""
    from upcycle.models.base import base_fingerprint, resolve_base
    from upcycle.training.config import LoraSettings

    meta = run.meta
    recorded = meta.get("experts", {}).get("config")
    if "clusters" not in meta or recorded is None or not run.expert_ids():
        raise UserError(f"{run.path}: no trained experts to grow; run `upcycle introvert train-experts {run.path}` "
                        "first")
    if base is not None:
        asked = resolve_base(base)
        if asked != run.base and base_fingerprint(asked) != base_fingerprint(run.base):
            raise UserError(f"--base {base} is not the base this run's experts were trained on ({run.base}); "
                            "add data with the run's own base (leave out --base)")
    return ExpertConfig(**(recorded | {"lora": LoraSettings(**recorded["lora"])}))


def refuse_token_ids(data: str, text_field: str) -> None:
    """Refuse a JSON Lines file of token ids: ids belong to the tokenizer that made them, and the run's experts read
    only what its own base's tokenizer makes of text. (Text is all add-data can take, so this is the check there is:
    whichever tokenizer an id file came from, it cannot be used.)"""
    import json

    path = Path(data)
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return  # a .json array, or malformed: load_documents says what is wrong
    if isinstance(row, dict) and text_field not in row and ({"input_ids", "tokens"} & set(row)):
        raise UserError(f"--data {data}: rows hold token ids (made by some tokenizer), not text in '{text_field}'; "
                        "give the documents' text so add-data tokenizes it with the run's base")


def recorded_generations(run: Run) -> list[dict[str, Any]]:
    """run.json's `generations`, starting with generation 0 (the data the run was built from) when none is kept yet."""
    meta = run.meta
    if meta.get("generations"):
        return list(meta["generations"])
    splits = run_splits(meta)
    return [{"generation": 0, "data": meta["data"], "hash": content_hash(splits),
             "documents": {name: len(docs) for name, docs in splits.items()}, "clusters": meta["clusters"]["k"],
             "experts_trained": run.expert_ids(), "time": meta.get("created")}]


def load_generation(run: Run, data: str, number: int) -> Generation:
    """NEW read, split and prefixed as generation `number` of `run` (an empty NEW is a UserError of load_documents)."""
    meta = run.meta
    local = Path(data).expanduser()
    spec = str(local.resolve()) if local.exists() else data  # run.json must find it from any working directory
    added = generation_splits(spec, meta.get("text_field", "text"), SplitConfig(**meta.get("splits", {})), number)
    old = run_splits(meta)
    merged = merge_splits(old, added)
    new = {name: merged[name][len(old[name]):] for name in SPLITS}
    return Generation(number, spec, content_hash(added), new, old)


def staged_plan(run: Run, generation: Generation, config: AddConfig) -> dict[str, Any]:
    """The staged plan of this generation: the one an interrupted run left (same NEW), or a new one."""
    pending = run.path / PENDING
    if (pending / PLAN_FILE).is_file():
        plan = read_json(pending / PLAN_FILE)
        if plan["record"]["hash"] != generation.digest:
            raise UserError(f"{run.path}: an interrupted add-data of {plan['record']['data']} is not finished; "
                            f"rerun `upcycle introvert add-data {run.path} --data {plan['record']['data']}` first")
        log.info("resuming the staged add-data of %s", generation.data)
        return plan
    with atomic_directory(pending) as tmp:
        plan = plan_generation(run, generation, config, tmp / "clusters")
        write_json(tmp / PLAN_FILE, plan)
    return plan


def plan_generation(run: Run, generation: Generation, config: AddConfig, out: Path) -> dict[str, Any]:
    """Assign the new documents, update the centroids, write the complete new clusters/ into `out`, and return the
    plan: the generation's record and the experts to train."""
    from upcycle.introvert.clustering.clusters import Clusters
    from upcycle.introvert.clustering.corpus import write_labelled_clusters
    from upcycle.introvert.embedding import load_embedder
    from upcycle.introvert.router import calibrate_guard

    old = Clusters.load(run.clusters_dir)
    embedder = load_embedder(run.clusters_dir / "embedder")
    embeddings = {name: np.concatenate([np.load(run.clusters_dir / EMBEDDINGS / f"{name}.npy"),
                                        _encode(embedder, generation.new[name], old.dim)]).astype(np.float32)
                  for name in SPLITS}  # old documents' rows, then the new ones': the order of the merged splits
    threshold = calibrate_guard(run, config.routing()).threshold
    n_old = len(generation.old["train"])
    grown, labels, summary = assign_documents(old, embeddings["train"][:n_old], embeddings["train"][n_old:],
                                              threshold, config, seed=run.meta["clusters"]["config"]["seed"])
    shutil.copytree(run.clusters_dir / "embedder", out / "embedder")
    (out / EMBEDDINGS).mkdir()
    for name, matrix in embeddings.items():
        np.save(out / EMBEDDINGS / f"{name}.npy", matrix)
    merged = merge_splits(generation.old, generation.new)
    write_labelled_clusters(out, merged, embeddings, grown)
    added = np.bincount(labels, minlength=grown.k)[:old.k]  # [K_old] new training documents per old cluster
    grew = [c for c in range(old.k) if added[c] and added[c] > config.grow_fraction * old.sizes[c]]
    train = ([{"cluster": c, "mode": "continue"} for c in grew]
             + [{"cluster": c, "mode": "new"} for c in range(old.k, grown.k)])
    record = {"generation": generation.number, "data": generation.data, "hash": generation.digest,
              "documents": {name: len(docs) for name, docs in generation.new.items()}, "threshold": threshold,
              **summary, "clusters": grown.k, "config": asdict(config)}
    return {"record": record, "train": train, "sizes": grown.sizes.tolist()}


def _encode(embedder, docs: list[Document], dim: int) -> np.ndarray:
    """[N, D] float32 embeddings of `docs` ([0, D] for none: embedders refuse an empty list)."""
    if not docs:
        return np.zeros((0, dim), np.float32)
    return np.asarray(embedder.encode([d.text for d in docs]), np.float32)


def assign_documents(old, old_train: np.ndarray, new_train: np.ndarray, threshold: float, config: AddConfig,
                     seed: int = 0):
    """(the grown Clusters over old + new training documents, [N] cluster of each new document, counts).

    Shapes: N new training documents, M old ones, K old clusters, K' = K + new clusters, D embedding width.
    """
    from upcycle.introvert.clustering.clusters import Clusters, as_points, fit_kmeans
    from upcycle.introvert.router import CentroidRouter

    x = as_points(new_train, old.metric) if len(new_train) else np.zeros((0, old.dim), np.float32)  # [N, D]
    nearest, distances = (CentroidRouter(old.centroids, old.metric).route(x) if len(x)
                          else (np.zeros(0, np.int64), np.zeros(0, np.float32)))  # [N] each
    far = distances > threshold  # [N] beyond the guard: out of every existing cluster's domain
    k_new = new_cluster_count(int(far.sum()), old.sizes, config)
    labels = nearest.copy()
    centroids = old.centroids.copy()  # [K, D]
    for c in np.unique(labels[~far] if k_new else labels):
        members = x[(labels == c) & (~far if k_new else True)]  # [n_c, D] new documents joining cluster c
        n = int(old.sizes[c])
        centroids[c] = (n * old.centroids[c] + members.sum(0)) / (n + len(members))
        centroids[c] = as_points(centroids[c][None], old.metric)[0]  # only moved rows: the others stay bit-exact
    if k_new:
        fitted = fit_kmeans(x[far], k_new, metric=old.metric, seed=seed)
        labels[far] = old.k + fitted.assignments
        centroids = np.concatenate([centroids, fitted.centroids])  # [K', D]
    points = np.concatenate([as_points(old_train, old.metric), x])  # [M + N, D]
    assignments = np.concatenate([old.assignments, labels])  # [M + N]
    grown = Clusters(centroids, assignments, ((points - centroids[assignments]) ** 2).sum(1), metric=old.metric,
                     balanced=old.balanced, embedder=old.embedder)
    counts = {"joined": int((~far).sum()), "beyond_threshold": int(far.sum()), "new_clusters": k_new,
              "joined_beyond_threshold": 0 if k_new else int(far.sum())}
    return grown, labels, counts


def new_cluster_count(beyond: int, sizes: np.ndarray, config: AddConfig) -> int:
    """How many clusters the `beyond` documents past the threshold form: none when fewer than
    `min_cluster_documents`, else `new_clusters` or enough for about the mean size of the existing clusters."""
    if beyond < config.min_cluster_documents:
        return 0
    if config.new_clusters is not None:
        return min(config.new_clusters, beyond)
    return max(1, round(beyond / max(float(sizes.mean()), 1.0)))


def train_changed_expert(run: Run, generation: Generation, plan: dict[str, Any], item: dict[str, Any],
                         config: ExpertConfig) -> dict[str, Any]:
    """Train a new cluster's expert, or continue a grown cluster's on its old and new documents (the new share of
    its tokens × tokens_per_expert); skipped when this generation already trained it."""
    from upcycle.data.blocks import pack_texts
    from upcycle.introvert.experts import cached_base
    from upcycle.models.base import base_fingerprint
    from upcycle.training.lora import AdapterJob, train_lora_adapter

    cluster, mode = item["cluster"], item["mode"]
    name, out = expert_id(cluster), run.expert_dir(expert_id(cluster))
    done = read_json(out / "train.json") if run.is_trained(name) else {}
    if done.get("data_hash") == generation.digest:
        return {"expert": name, "tokens": done["tokens"], "earlier_seconds": done["seconds"], "skipped": True}
    labels = read_json(run.path / PENDING / "clusters" / DOCUMENT_CLUSTERS)
    docs = RunData(merge_splits(generation.old, generation.new), labels).docs("train", cluster)
    model, tokenizer = cached_base(run.base)
    blocks = pack_texts(tokenizer, [d.text for d in docs], config.block_size)
    cluster_tokens = int((blocks[1] != -100).sum())
    budget, previous = config.tokens_per_expert, {}
    if mode == "continue":
        fresh = pack_texts(tokenizer, [d.text for d in docs if d.id.startswith(f"g{generation.number}/")],
                           config.block_size)
        budget = max(1, round(config.tokens_per_expert * int((fresh[1] != -100).sum()) / max(cluster_tokens, 1)))
        previous = {"previous_tokens": done.get("tokens", 0) + done.get("previous_tokens", 0)}
    train = replace(replace(config, tokens_per_expert=budget).train_config(cluster),
                    seed=config.seed + cluster + 7919 * generation.number)  # new blocks each generation
    job = AdapterJob(config.lora, train, init_from=str(out) if mode == "continue" else None)
    log.info("%s %s on %d blocks of cluster %d", "continuing" if mode == "continue" else "training", name,
             blocks[0].shape[0], cluster)
    result = train_lora_adapter(model, blocks, job, out, description=name, extra_meta={
        "expert": name, "cluster": cluster, "cluster_tokens": cluster_tokens, "base": run.base,
        "base_fingerprint": base_fingerprint(run.base), "expert_config": asdict(config),
        "generation": generation.number, "data_hash": generation.digest, "mode": mode, **previous})
    return {"expert": name, "tokens": result.tokens, "skipped": False}


def commit_generation(run: Run, plan: dict[str, Any], generations: list[dict[str, Any]]) -> None:
    """Replace clusters/ with the staged one and run.json with the grown description, together (see
    `atomic_directory`), then drop the stage."""
    pending = run.path / PENDING
    meta = run.meta
    grown = meta["clusters"] | {"k": len(plan["sizes"]), "sizes": plan["sizes"]}

    def describe() -> None:
        run.write_meta(meta | {"clusters": grown, "generations": generations})

    with atomic_directory(run.clusters_dir, commit=describe) as tmp:
        shutil.copytree(pending / "clusters", tmp, dirs_exist_ok=True)
    shutil.rmtree(pending, ignore_errors=True)
