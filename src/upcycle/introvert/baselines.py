"""The comparisons every introvert-experts run is measured against, trained on the same total tokens.

- `lora-all`: one LoRA of the experts' rank on all training data (compute-matched: same tokens, same adapter).
- `lora-wide`: one LoRA of rank K x r on all training data (parameter-matched: as many adapter weights as all
  experts together).
- `full`: continued full pre-training of the base on the same tokens (the comparison MoIN's paper lost).

They are a training step of their own (`upcycle introvert train-baselines`, after `train-experts`): each lands in
RUN/baselines/<name>/ complete or not at all, finished ones are skipped, and `upcycle introvert evaluate` only
reads them.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from upcycle.data.blocks import pack_texts
from upcycle.errors import UserError
from upcycle.introvert.config import BaselineConfig, ExpertConfig
from upcycle.introvert.data import load_run_data
from upcycle.introvert.run import Run, expert_id
from upcycle.io import atomic_directory, ensure_writable_dir, read_json, write_json
from upcycle.training.config import LoraSettings, TrainConfig
from upcycle.training.loop import train
from upcycle.training.lora import AdapterJob, train_lora_adapter

log = logging.getLogger(__name__)
WRITABLE_HINT = "make the run directory writable, or copy it somewhere writable"
BASELINES = ("lora-all", "lora-wide", "full")


def baseline_dir(run: Run, name: str) -> Path:
    return run.path / "baselines" / name


def baseline_names(k: int) -> list[str]:
    """The baselines of a run with `k` experts (lora-wide is lora-all when k == 1, so it is left out)."""
    return [name for name in BASELINES if not (name == "lora-wide" and k == 1)]


def is_trained(run: Run, name: str) -> bool:
    """Whether baseline `name` is complete on disk (its train.json is written last, inside the atomic directory)."""
    return (baseline_dir(run, name) / "train.json").is_file()


def check_experts_trained(run: Run) -> list[str]:
    """The run's expert ids, or a UserError naming the missing ones and the command that trains them."""
    expert_ids = run.expert_ids()
    k = run.meta.get("clusters", {}).get("k", 0)
    missing = [expert_id(c) for c in range(k) if expert_id(c) not in expert_ids]
    if not k or missing:
        raise UserError(f"{run.path}: experts missing ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''});"
                        f" run `upcycle introvert train-experts {run.path}` first")
    return expert_ids


def train_baselines(run: Run | str | Path, config: BaselineConfig = BaselineConfig(), progress=None) -> dict[str, dict]:
    """Train each baseline not yet on disk, on as many tokens as all experts together; returns their train.json
    summaries (with `skipped` for those already trained)."""
    run = Run.of(run)
    with run.lock("train-baselines"):
        ensure_writable_dir(run.path / "baselines", hint=WRITABLE_HINT)
        for path in run.remove_stale_temporaries():
            log.info("removed %s, left by an interrupted run", path)
        expert_ids = check_experts_trained(run)
        names = baseline_names(run.meta["clusters"]["k"])
        todo = [name for name in names if not is_trained(run, name)]
        if todo:
            from upcycle.models.base import load_base

            base_model, tokenizer = load_base(run.base)
            total_tokens = sum(read_json(run.expert_dir(e) / "train.json")["tokens"] for e in expert_ids)
            _train(run, todo, trained_expert_config(run), total_tokens, config, base_model, tokenizer, progress)
        return {name: read_json(baseline_dir(run, name) / "train.json") | {"skipped": name not in todo}
                for name in names}


def trained_expert_config(run: Run) -> ExpertConfig:
    """The settings the run's experts were trained with (run.json), which the baselines copy."""
    raw = dict(run.meta.get("experts", {}).get("config", {}))
    if "lora" in raw:
        raw["lora"] = LoraSettings(**raw["lora"])
    return ExpertConfig(**raw)


def _train(run: Run, names: list[str], expert_config: ExpertConfig, total_tokens: int, config: BaselineConfig,
           base_model, tokenizer, progress) -> None:
    """Train the baselines `names` on the run's training split, from the clean `base_model` (left unchanged)."""
    k = run.meta["clusters"]["k"]
    docs = load_run_data(run).docs("train")
    blocks = pack_texts(tokenizer, [d.text for d in docs], expert_config.block_size, keep_remainder=False)
    steps = max(1, math.ceil(total_tokens / (expert_config.batch_size * expert_config.block_size)))
    train_config = TrainConfig(steps=steps, batch_size=expert_config.batch_size, lr=expert_config.lr,
                               warmup_steps=min(expert_config.warmup_steps * 4, steps - 1) or 1,
                               seed=expert_config.seed + 10_000)
    for name in names:
        path = baseline_dir(run, name)
        if name == "lora-all":
            lr = config.lora_all_lr or expert_config.lr
            train_lora_adapter(base_model, blocks, AdapterJob(expert_config.lora, replace(train_config, lr=lr)),
                               path, extra_meta={"baseline": name}, description=name, progress=progress)
        elif name == "lora-wide":
            lora = replace(expert_config.lora, rank=expert_config.lora.rank * k, alpha=expert_config.lora.alpha * k)
            train_lora_adapter(base_model, blocks, AdapterJob(lora, replace(train_config, lr=config.wide_lr)),
                               path, extra_meta={"baseline": name}, description=name, progress=progress)
        else:
            _train_full(base_model, tokenizer, blocks, replace(train_config, lr=config.full_lr), path, progress)


def _train_full(base_model, tokenizer, blocks, train_config: TrainConfig, out: Path, progress) -> None:
    torch.manual_seed(train_config.seed)
    model = copy.deepcopy(base_model)
    for p in model.parameters():
        p.requires_grad_(True)
    result = train(model, blocks, train_config, description="full", progress=progress)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / "train.json", {"baseline": "full", "train": asdict(train_config),
                                              "tokens": result.tokens, "seconds": result.seconds,
                                              "tokens_per_second": result.tokens_per_second,
                                              "final_loss": result.history[-1]["loss"], "history": result.history})


def load_baseline(run: Run, name: str, base_model):
    """The baseline as a model ready for scoring (a PeftModel over a copy of the base, or the full checkpoint)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = baseline_dir(run, name)
    if name == "full":
        return AutoModelForCausalLM.from_pretrained(path).to(next(base_model.parameters()).device).eval()
    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(path)).eval()
