"""The comparisons every introvert-experts run is measured against, trained on the same total tokens.

- `lora-all`: one LoRA of the experts' rank on all training data (compute-matched: same tokens, same adapter).
- `lora-wide`: one LoRA of rank K x r on all training data (parameter-matched: as many adapter weights as all
  experts together).
- `full`: continued full pre-training of the base on the same tokens (the comparison MoIN's paper lost).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch

from upcycle.data.packing import pack, tokenize
from upcycle.introvert.config import BaselineConfig, ExpertConfig
from upcycle.introvert.data import load_run_data
from upcycle.introvert.run import Run
from upcycle.io import atomic_directory, read_json, write_json
from upcycle.training.config import TrainConfig
from upcycle.training.loop import train
from upcycle.training.lora import AdapterJob, train_lora_adapter

BASELINES = ("lora-all", "lora-wide", "full")


def baseline_dir(run: Run, name: str) -> Path:
    return run.path / "baselines" / name


def train_baselines(run: Run, expert_config: ExpertConfig, total_tokens: int, config: BaselineConfig,
                    base_model, tokenizer, progress=None) -> dict[str, dict]:
    """Train each baseline that is not already on disk; return their train.json summaries."""
    k = run.meta["clusters"]["k"]
    docs = load_run_data(run).docs("train")
    blocks = pack(tokenize(tokenizer, [d.text for d in docs]), expert_config.block_size, tokenizer.pad_token_id,
                  keep_remainder=False)
    steps = max(1, math.ceil(total_tokens / (expert_config.batch_size * expert_config.block_size)))
    train_config = TrainConfig(steps=steps, batch_size=expert_config.batch_size, lr=expert_config.lr,
                               warmup_steps=min(expert_config.warmup_steps * 4, steps - 1) or 1,
                               seed=expert_config.seed + 10_000)
    out: dict[str, dict] = {}
    for name in BASELINES:
        if name == "lora-wide" and k == 1:
            continue  # identical to lora-all
        path = baseline_dir(run, name)
        if not (path / "train.json").is_file():
            if name == "lora-all":
                lr = config.lora_all_lr or expert_config.lr
                train_lora_adapter(base_model, blocks, AdapterJob(expert_config.lora, replace(train_config, lr=lr)),
                                   path, extra_meta={"baseline": name}, description=name, progress=progress)
            elif name == "lora-wide":
                lora = replace(expert_config.lora, rank=expert_config.lora.rank * k,
                               alpha=expert_config.lora.alpha * k)
                train_lora_adapter(base_model, blocks, AdapterJob(lora, replace(train_config, lr=config.wide_lr)),
                                   path, extra_meta={"baseline": name}, description=name, progress=progress)
            else:
                _train_full(base_model, tokenizer, blocks, replace(train_config, lr=config.full_lr), path, progress)
        out[name] = read_json(path / "train.json")
    return out


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
