"""Structured magnitude pruning of FFN neurons (+ optional fine-tuning through the shared loop).

A neuron's importance is the product of the norms of its gate row, up row and down column, a first-order proxy
for how much it can contribute to the output. Each FFN keeps its top `keep` fraction and is physically sliced to
a smaller dense SwiGLU, so the pruned model is a plain Hugging Face model with a smaller intermediate size.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.models.surgery import find_ffns
from upcycle.training.config import TrainConfig
from upcycle.training.loop import TrainResult, train


def neuron_importance(mlp: nn.Module) -> torch.Tensor:
    """||gate_i|| · ||up_i|| · ||down_:,i|| for every intermediate neuron i. -> [I]."""
    return (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0))


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight)
    return new


@torch.no_grad()
def prune_ffns(model: nn.Module, keep: float) -> int:
    """Keep the `keep` fraction of each FFN's neurons by importance (in place). Returns the new intermediate size."""
    if not 0.0 < keep <= 1.0:
        raise UserError(f"the fraction of neurons to keep must be in (0, 1], got {keep}")
    kept = 0
    for _, mlp in find_ffns(model):
        size = mlp.gate_proj.out_features
        kept = max(1, round(keep * size))
        index = neuron_importance(mlp).topk(kept).indices.sort().values  # keep the original order
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, index, 0), _sliced(mlp.up_proj, index, 0)
        mlp.down_proj = _sliced(mlp.down_proj, index, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = kept
    model.config.intermediate_size = kept  # uniform ratio: the pruned model saves and loads as a plain HF model
    return kept


def finetune_pruned(model: nn.Module, blocks: tuple[torch.Tensor, torch.Tensor], config: TrainConfig,
                    ffn_only: bool = True) -> TrainResult:
    """Recover quality after pruning with the LM loss through the shared loop (only FFN weights by default)."""
    params = [p for _, mlp in find_ffns(model) for p in mlp.parameters()] if ffn_only else None
    for param in model.parameters():
        param.requires_grad_(not ffn_only)
    for param in params or []:
        param.requires_grad_(True)
    return train(model, blocks, config, parameters=params, description="pruning fine-tune")
