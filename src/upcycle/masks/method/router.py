"""Token routers for mask experts: a small linear layer scores the E experts for each token.

Legend: T tokens, D model dim, E experts, K experts chosen per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MaskRouting:
    """A mask router's decision for T tokens (the MoE layer's own is `upcycle.moe.routers.Routing`)."""

    probs: torch.Tensor
    """[T, E] softmax over experts (float32, or float64 in a float64 model)."""
    expert_idx: torch.Tensor | None
    """[T, K] chosen experts for top-k routing; None for soft routing."""
    weights: torch.Tensor
    """top-k: [T, K], exactly 1 in the forward pass with the gradient of the chosen probabilities (straight-through);
    soft: [T, E], the probabilities themselves."""


class TokenRouter(nn.Module):
    """Linear scores -> softmax -> hard top-k (straight-through) or soft weights."""

    def __init__(self, hidden: int, experts: int, top_k: int = 1, routing: str = "topk", bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, experts, bias=bias)
        self.top_k, self.routing = top_k, routing

    @property
    def num_experts(self) -> int:
        return self.proj.out_features

    def forward(self, x: torch.Tensor) -> MaskRouting:
        """x [T, D] -> MaskRouting."""
        logits = self.proj(x)  # [T, E]
        # At least float32, so that near-ties and small probability gaps survive a bf16 model.
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        if self.routing == "soft":
            return MaskRouting(probs, None, probs)
        expert_idx = probs.topk(self.top_k, dim=-1).indices  # [T, K]
        chosen = probs.gather(1, expert_idx)  # [T, K]
        # Forward value exactly 1 (the mask is the plain union of the chosen experts' masks); backward lets the task
        # loss and the sparsity penalty reach the router through the chosen probabilities.
        weights = 1.0 + (chosen - chosen.detach())
        return MaskRouting(probs, expert_idx, weights)

    @torch.no_grad()
    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """Inference shortcut: the chosen experts [T, K] only (top-k routing), as `forward(x).expert_idx`."""
        logits = self.proj(x)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [T, E]
        return probs.topk(self.top_k, dim=-1).indices

    def extra_repr(self) -> str:
        return f"routing={self.routing}, top_k={self.top_k}"
