"""One process of the 2-process DDP test: `torchrun --standalone --nproc_per_node 2 distributed_worker.py OUT`.

Each rank trains three tiny models through `upcycle.training.loop.train` (a dense Llama with the causal-LM loss,
its sparse-upcycled MoE with `moe_loss_fn`, and its mask model with `train_masks`) and saves, per run, the blocks it
drew at every step, the trainable parameters after every step and the loop's history to OUT/<run>-rank<r>.pt.
The test (test_distributed.py) compares the ranks with each other and with a single-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

VOCAB, LENGTH, BLOCKS = 64, 16, 48


def pattern_blocks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[BLOCKS, LENGTH] arithmetic sequences mod VOCAB (random start and stride 1..3): learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (BLOCKS, 1), generator=generator)
    stride = torch.randint(1, 4, (BLOCKS, 1), generator=generator)
    inputs = (start + stride * torch.arange(LENGTH)) % VOCAB  # [N, L]
    return inputs, inputs.clone()


def tiny_llama(seed: int = 0):
    """A random float64 Llama (hidden 32, 2 layers); float64 so ranks and reference agree to rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).double()


def moe_config():
    from upcycle.moe.config import MoEConfig

    return MoEConfig(num_experts=4, router="st_moe", dispatch="dropless", router_init_std=0.5)


def tiny_moe(seed: int = 0):
    """The tiny Llama with both MLPs upcycled into 4 top-2 experts (float64)."""
    from upcycle.moe.upcycling import UpcycleConfig, upcycle_model

    model = tiny_llama(seed)
    upcycle_model(model, moe_config(), UpcycleConfig(every=1, noise=0.01))
    return model.double()


def train_config(steps: int, lr: float):
    from upcycle.training.config import TrainConfig

    return TrainConfig(steps=steps, batch_size=4, lr=lr, warmup_steps=1, min_lr_ratio=1.0, seed=3)


def recording(loss_fn, drawn: list):
    """Wrap a loss_fn to keep the blocks the loop drew for each step."""

    def wrapped(model, inputs, labels):
        drawn.append((inputs.clone(), labels.clone()))
        return loss_fn(model, inputs, labels)

    return wrapped


def trainable(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).cpu().clone()


def record_run(build, loss_fn, lr: float) -> dict:
    """Train build() for 6 steps; the blocks drawn and the trainable parameters after each step."""
    from upcycle.training.loop import train

    model, drawn, params = build(), [], []
    initial = trainable(model)
    result = train(model, pattern_blocks(), train_config(6, lr), loss_fn=recording(loss_fn, drawn),
                   after_step=lambda step, record: params.append(trainable(model)))
    return {"drawn": drawn, "initial": initial, "params": params, "history": result.history}


def run(out: Path, rank: int) -> None:
    from upcycle.masks.config import MaskTrainConfig
    from upcycle.masks.method.train import train_masks
    from upcycle.moe.train import moe_loss_fn
    from upcycle.training.loop import causal_lm_loss

    torch.save(record_run(tiny_llama, causal_lm_loss, 1e-2), out / f"lm-rank{rank}.pt")
    torch.save(record_run(tiny_moe, moe_loss_fn(moe_config()), 1e-2), out / f"moe-rank{rank}.pt")

    model = tiny_llama()
    config = MaskTrainConfig(target=0.5, warmup_fraction=0.0, lambda_lr=0.5, train=train_config(4, 0.05))
    result, lagrangian = train_masks(model, pattern_blocks(), config)
    torch.save({"history": result.history, "lagrangian": lagrangian.state_dict(), "params": trainable(model)},
               out / f"masks-rank{rank}.pt")


if __name__ == "__main__":
    import os

    torch.set_num_threads(1)
    os.environ.setdefault("UPCYCLE_NO_PROGRESS", "1")
    run(Path(sys.argv[1]), int(os.environ["RANK"]))
    if torch.distributed.is_initialized():  # a clean shutdown: exiting with the group alive can abort in gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
