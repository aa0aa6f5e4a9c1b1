"""The one training loop every method shares, checkpoint/resume, and executors for independent jobs.

Reading order:
- `loop`        `train`: random packed blocks, AdamW, warm-up + cosine, resumable; methods differ by `loss_fn`
- `lora`        a PEFT LoRA adapter on a frozen base through that loop
- `executors`   independent jobs in this process, local worker processes or Ray
"""

from upcycle.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
