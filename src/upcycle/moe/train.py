"""Train an upcycled MoE model through the project's one training loop, aux losses inside the loss_fn.

Each step's loss is the LM loss + alpha * mean_l balance_l + beta * mean_l z_l; the step's routing statistics
(averaged over MoE layers, optionally per layer) come back as the loss_fn's metrics, so they land in the loop's
per-step history next to the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from upcycle.data.packing import IGNORE_INDEX
from upcycle.moe.collector import collect_routing
from upcycle.moe.config import MoEConfig
from upcycle.training.config import TrainConfig
from upcycle.training.loop import TrainResult, train

log = logging.getLogger(__name__)

MoELossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def real_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] 1 up to each row's last labelled position, 0 after it (trailing padding).

    Labels alone cannot tell padding from a masked prompt (both are IGNORE_INDEX), but padding only ever trails:
    prompt tokens are followed by labelled answer tokens, so they stay real and are routed.
    """
    labelled = (labels != IGNORE_INDEX).int()  # [B, L]
    return labelled.flip(-1).cummax(dim=-1).values.flip(-1)  # [B, L]


def moe_loss_fn(moe: MoEConfig, per_layer_stats: bool = False) -> MoELossFn:
    """A loss_fn for `training.loop.train`: LM loss + weighted aux losses, routing statistics as metrics."""

    def loss_fn(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
        mask = real_token_mask(labels)
        with collect_routing(model, padding_mask=mask) as collector:
            output = model(input_ids=inputs, attention_mask=mask, labels=labels)
        aux = collector.aux_loss(moe.balance_loss_coef, moe.z_loss_coef)
        metrics = {"lm_loss": float(output.loss.detach()), "aux_loss": float(aux.detach()),
                   **collector.metrics(per_layer=per_layer_stats)}
        return output.loss + aux.to(output.loss.device), metrics

    return loss_fn


def train_moe(model: nn.Module, moe: MoEConfig, train_blocks: tuple[torch.Tensor, torch.Tensor], config: TrainConfig,
              *, eval_blocks: tuple[torch.Tensor, torch.Tensor] | None = None, per_layer_stats: bool = False,
              checkpoint_dir: str | Path | None = None, description: str | None = None,
              progress=None) -> TrainResult:
    """Train every parameter of the upcycled `model` (experts, routers, attention, embeddings) on packed blocks."""
    return train(model, train_blocks, config, eval_blocks=eval_blocks, loss_fn=moe_loss_fn(moe, per_layer_stats),
                 checkpoint_dir=checkpoint_dir, description=description or f"moe-{moe.router}", progress=progress)
