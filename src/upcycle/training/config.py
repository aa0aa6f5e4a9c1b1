"""Typed settings of the shared training loop and of a LoRA adapter (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import UserError


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Blocks per step on each process."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    eval_every: int = 0
    """Evaluate on the held-out blocks every this many steps (0: only at the end)."""
    eval_blocks: int = 64
    """Held-out blocks used for each evaluation."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps when a checkpoint dir is given (0: never)."""
    seed: int = 0
    """Seed for block sampling and any randomness in the model."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise UserError("steps and batch_size must be >= 1")
        if not self.lr > 0:
            raise UserError(f"learning rate must be > 0, got {self.lr}")


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
