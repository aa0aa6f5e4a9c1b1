"""Train a PEFT LoRA adapter on a frozen base through the shared loop, and save it in PEFT's format."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from upcycle.errors import UserError
from upcycle.io import atomic_directory, write_json
from upcycle.training.loop import TrainConfig, TrainResult, train


@dataclass
class LoraSettings:
    """The adapter's shape. Defaults: rank 8 on every linear layer of the decoder (not the LM head)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """Dropout on the LoRA input (0: deterministic experts)."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or PEFT's 'all-linear' (every nn.Linear except the output head)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias="none", task_type="CAUSAL_LM")


@dataclass
class AdapterJob:
    """One adapter to train: settings plus the training blocks."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)


def train_lora_adapter(base_model: torch.nn.Module, blocks: tuple[torch.Tensor, torch.Tensor], job: AdapterJob,
                       out: str | Path, *, extra_meta: dict | None = None, description: str = "lora",
                       progress=None) -> TrainResult:
    """Train a LoRA adapter on a copy of `base_model` (left untouched) and save it atomically to `out`.

    `out` holds `adapter_config.json` + `adapter_model.safetensors` (load with `PeftModel.from_pretrained`) and
    `train.json` with the settings, token count and loss history.
    """
    from peft import get_peft_model

    torch.manual_seed(job.train.seed)
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
