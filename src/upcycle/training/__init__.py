"""The one training loop every method shares, checkpoint/resume, and executors for independent jobs.

Reading order:
- `config`      TrainConfig (optimisation) and LoraSettings (adapter shape), importable without torch
- `loop`        `train`: random packed blocks, AdamW, warm-up + cosine, resumable, under accelerate unchanged
- `lora`        one PEFT LoRA adapter trained through the loop and saved in PEFT's format
- `executors`   run independent jobs here, in worker processes or on Ray
"""
