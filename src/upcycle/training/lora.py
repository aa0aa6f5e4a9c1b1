"""Train a PEFT LoRA adapter on a frozen base through the shared loop, and save it in PEFT's format."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from upcycle.io import atomic_directory, write_json
from upcycle.training.config import LoraSettings, TrainConfig
from upcycle.training.loop import TrainResult, train


@dataclass
class AdapterJob:
    """One adapter to train: settings plus the training blocks."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str | None = None
    """A PEFT adapter directory to continue training (its own shape then applies), instead of a fresh adapter."""


def train_lora_adapter(base_model: torch.nn.Module, blocks: tuple[torch.Tensor, torch.Tensor], job: AdapterJob,
                       out: str | Path, *, extra_meta: dict | None = None, description: str = "lora",
                       progress=None) -> TrainResult:
    """Train a LoRA adapter on a copy of `base_model` (left untouched) and save it atomically to `out`.

    `out` holds `adapter_config.json` + `adapter_model.safetensors` (load with `PeftModel.from_pretrained`) and
    `train.json` with the settings, token count and loss history.
    """
    from peft import PeftModel, get_peft_model

    torch.manual_seed(job.train.seed)
    if job.init_from is not None:  # read fully before `out` (possibly the same directory) is replaced below
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), job.init_from, is_trainable=True)
    else:
        model = get_peft_model(copy.deepcopy(base_model), job.lora.peft_config())
    result = train(model, blocks, job.train, description=description, progress=progress)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        write_json(Path(tmp) / "train.json", {"lora": asdict(job.lora), "train": asdict(job.train),
                                              "tokens": result.tokens, "seconds": result.seconds,
                                              "tokens_per_second": result.tokens_per_second,
                                              "final_loss": result.history[-1]["loss"],
                                              "history": result.history, **(extra_meta or {})})
    return result
