"""Train one LoRA expert per cluster on the frozen base: independent, resumable jobs.

Each expert is a PEFT directory `RUN/experts/expert-NNNNN/` that appears only when complete (atomic rename), so a
killed run leaves no half-written adapter and a rerun skips finished experts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from functools import lru_cache

from upcycle.errors import UserError
from upcycle.introvert.config import ExpertConfig
from upcycle.introvert.data import load_run_data
from upcycle.introvert.run import Run, expert_id
from upcycle.io import ensure_writable_dir, read_json
from upcycle.training.executors import check_executor, run_jobs
from upcycle.training.lora import AdapterJob, train_lora_adapter

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def cached_base(base: str):
    """The base model and tokenizer on CPU, loaded once per process for all the experts it trains."""
    from upcycle.models.base import load_base

    return load_base(base, device="cpu")


def cluster_blocks(run: Run, cluster: int, split: str, block_size: int, tokenizer):
    """Packed (inputs, labels) of the cluster's documents in `split`."""
    from upcycle.data.blocks import pack_texts

    return pack_texts(tokenizer, [d.text for d in load_run_data(run).docs(split, cluster)], block_size)


def train_expert(run: Run | str, cluster: int, config: ExpertConfig, progress=None) -> dict:
    """Train (or skip, when already on disk) the expert of `cluster`; returns its summary."""
    from upcycle.models.base import base_fingerprint

    run = Run.of(run)
    name = expert_id(cluster)
    out = run.expert_dir(name)
    if run.is_trained(name):
        return read_json(out / "train.json") | {"skipped": True}
    model, tokenizer = cached_base(run.base)
    blocks = cluster_blocks(run, cluster, "train", config.block_size, tokenizer)
    if blocks[0].shape[0] == 0:
        raise UserError(f"{name}: cluster {cluster} has no training text; use fewer clusters")
    cluster_tokens = int((blocks[1] != -100).sum())
    log.info("training %s on %d blocks of cluster %d", name, blocks[0].shape[0], cluster)
    result = train_lora_adapter(model, blocks, AdapterJob(config.lora, config.train_config(cluster)), out,
                                extra_meta={"expert": name, "cluster": cluster, "cluster_tokens": cluster_tokens,
                                            "base": run.base, "base_fingerprint": base_fingerprint(run.base),
                                            "expert_config": asdict(config)},
                                description=name, progress=progress)
    return {"expert": name, "cluster": cluster, "tokens": result.tokens, "seconds": result.seconds,
            "tokens_per_second": result.tokens_per_second, "final_loss": result.history[-1]["loss"],
            "cluster_tokens": cluster_tokens, "skipped": False}


def train_experts(run: Run | str, config: ExpertConfig, *, executor: str = "local", workers: int = 1,
                  address: str | None = None, clusters: list[int] | None = None) -> list[dict]:
    """Train every cluster's expert (or the listed ones) with the chosen executor; finished ones are skipped."""
    check_executor(executor, workers)  # before run.json records settings for training that would not start
    run = Run.of(run)
    with run.lock("train-experts"):
        ensure_writable_dir(run.experts_dir, hint="make the run directory writable, or copy it somewhere writable")
        for path in run.remove_stale_temporaries():
            log.info("removed %s, left by an interrupted run", path)
        meta = run.meta
        if "clusters" not in meta:
            raise UserError(f"{run.path}: no clusters yet; run `upcycle introvert cluster --out {run.path}` first")
        k = meta["clusters"]["k"]
        todo = clusters if clusters is not None else list(range(k))
        bad = [c for c in todo if not 0 <= c < k]
        if bad:
            raise UserError(f"clusters {bad} do not exist in this run (k={k})")
        check_same_settings(run, config)
        run.update_meta(experts={"config": asdict(config)})
        jobs = [(run, c, config) for c in todo]  # a Run pickles with its run.json, for worker processes too
        return run_jobs(train_expert, jobs, executor=executor, workers=workers, address=address,
                        description="experts")


def check_same_settings(run: Run, config: ExpertConfig) -> None:
    """Refuse settings other than those the run's finished experts were trained with.

    Training only the missing experts and recording the new settings in run.json would describe training that never
    happened; retraining the finished ones unasked would throw away work. So the user chooses: rerun with the run's
    settings (the error lists them as flags), or delete RUN/experts to train every expert with the new ones.
    """
    asked = _flags(asdict(config))
    recorded = run.meta.get("experts", {}).get("config")
    for expert in (e for e in run.expert_ids() if run.is_trained(e)):
        used = read_json(run.expert_dir(expert) / "train.json").get("expert_config", recorded)
        if used is None:
            continue  # trained before settings were recorded: nothing to compare with
        differences = [f"--expert.{key} {value}" for key, value in _flags(used).items() if asked.get(key) != value]
        if differences:
            raise UserError(f"{run.path}: {expert} was trained with {' '.join(differences)}; rerun with those "
                            f"settings to train the missing experts, or delete {run.experts_dir} to retrain all")


def _flags(config: dict, prefix: str = "") -> dict[str, object]:
    """{'lora.rank': 8, 'lr': 0.002, ...}: nested settings as their flag names, values as JSON reads them back."""
    out: dict[str, object] = {}
    for key, value in json.loads(json.dumps(config)).items():
        if isinstance(value, dict):
            out |= _flags(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
