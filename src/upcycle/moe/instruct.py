"""Recipes of the Flan-MoE experiment: build a dense or upcycled model, instruction-tune it, fine-tune it on held-out
task types, and score it on their responses. Dense and MoE train through the same loop (`training.loop.train`,
the MoE through `moe.train.train_moe`: aux losses and routing statistics in every step's history).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from upcycle.data.instructions import Example, encode_examples, pack_examples, pad_examples
from upcycle.data.packing import IGNORE_INDEX
from upcycle.moe.config import MoEConfig, UpcycleConfig
from upcycle.training.config import TrainConfig
from upcycle.training.loop import TrainResult, train

log = logging.getLogger(__name__)

ARCHS = ("dense", "moe")
WEIGHTS = "model.safetensors"


def build_model(arch: str, base: str | None, moe: MoEConfig, every: int, seed: int) -> tuple[nn.Module, object]:
    """(model, tokenizer): the dense base, or the base sparse-upcycled (experts copy its MLPs, routers seeded)."""
    from upcycle.models.base import load_base
    from upcycle.moe.upcycling import upcycle_model

    model, tokenizer = load_base(base)
    if arch == "moe":
        upcycle_model(model, moe, UpcycleConfig(every=every, seed=seed))
    return model, tokenizer


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's weights as `directory/model.safetensors`, atomically (the directory appears complete)."""
    from safetensors.torch import save_model

    from upcycle.io import atomic_directory

    with atomic_directory(directory) as tmp:
        save_model(model, str(tmp / WEIGHTS))
    return Path(directory)


def load_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load weights saved by `save_weights` into a model of the same structure."""
    from safetensors.torch import load_model

    load_model(model, str(Path(directory) / WEIGHTS), strict=True, device=str(next(model.parameters()).device))
    return model


def training_rows(tokenizer, examples: Sequence[Example], block_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Packed rows (inputs, labels) of whole examples, prompts masked, and what was kept."""
    encoded, dropped = encode_examples(tokenizer, examples, block_size)
    inputs, labels = pack_examples(encoded, block_size, tokenizer.pad_token_id)
    info = {"examples": len(encoded), "dropped_too_long": dropped, "rows": int(inputs.shape[0]),
            "response_tokens": int((labels != IGNORE_INDEX).sum())}
    return inputs, labels, info


def train_stage(model: nn.Module, arch: str, moe: MoEConfig, rows: tuple[torch.Tensor, torch.Tensor],
                config: TrainConfig, checkpoint_dir: str | Path | None, description: str,
                progress=None) -> TrainResult:
    """Train every parameter on the rows: causal-LM loss on the response tokens (+ aux losses for the MoE)."""
    if arch == "moe":
        from upcycle.moe.train import train_moe

        return train_moe(model, moe, rows, config, checkpoint_dir=checkpoint_dir, description=description,
                         progress=progress)
    return train(model, rows, config, checkpoint_dir=checkpoint_dir, description=description, progress=progress)


@torch.no_grad()
def evaluate_responses(model: nn.Module, tokenizer, examples: Sequence[Example], block_size: int,
                       batch_size: int = 32) -> dict:
    """Loss, perplexity and exact match on the response tokens of each task type, plus routing statistics.

    Exact match is teacher-forced: every response token (and the closing EOS) is the argmax given the prompt and the
    previous response tokens, which is exactly when greedy decoding reproduces the response and stops. Each example
    is its own row (no packing), batched by length; padding is masked out of routing and capacity.
    """
    from upcycle.moe.collector import collect_routing

    encoded, dropped = encode_examples(tokenizer, examples, block_size)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_task: dict[str, dict[str, float]] = {}
    routing: list[dict[str, float]] = []
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        length = max(len(e.input_ids) for e in chunk)
        inputs, labels = pad_examples(chunk, length, tokenizer.pad_token_id)
        inputs, labels = inputs.to(device), labels.to(device)
        mask = (torch.arange(length, device=device)[None] < torch.tensor(
            [len(e.input_ids) for e in chunk], device=device)[:, None]).long()  # [B, L]
        with collect_routing(model, padding_mask=mask) as collector:
            logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1].float()  # [B, L-1, V]
        routing.append(collector.metrics())
        target = labels[:, 1:]  # [B, L-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX,
                                                reduction="none")  # [B, L-1]
        labelled = target != IGNORE_INDEX
        correct = (logits.argmax(-1) == target) | ~labelled
        for row, index in enumerate(order[start:start + batch_size]):
            stats = per_task.setdefault(encoded[index].task, {"nll": 0.0, "tokens": 0, "exact": 0, "examples": 0})
            stats["nll"] += float(nll[row].sum())
            stats["tokens"] += int(labelled[row].sum())
            stats["exact"] += int(bool(correct[row].all()))
            stats["examples"] += 1
    model.train(was_training)
    out: dict = {"tasks": {}, "dropped_too_long": dropped}
    for task, s in sorted(per_task.items()):
        loss = s["nll"] / max(s["tokens"], 1)
        out["tasks"][task] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                              "exact_match": s["exact"] / max(s["examples"], 1), "examples": s["examples"],
                              "tokens": s["tokens"]}
    total_tokens = sum(s["tokens"] for s in per_task.values())
    loss = sum(s["nll"] for s in per_task.values()) / max(total_tokens, 1)
    out.update(loss=loss, perplexity=math.exp(min(loss, 50.0)),
               exact_match=sum(t["exact_match"] for t in out["tasks"].values()) / max(len(out["tasks"]), 1))
    if routing and routing[0]:
        out["routing"] = {key: sum(r[key] for r in routing) / len(routing) for key in routing[0]}
    return out

