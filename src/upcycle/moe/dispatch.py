"""Dispatchers: move routed tokens to their experts and combine the outputs back, with or without capacity.

Both take the same `Routing` and `SwiGLUExperts`; a token's output is sum over its kept assignments of
gate * expert(x). A token with no kept assignment (dropped, or padding) gets 0, so the residual carries it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.moe.experts import SwiGLUExperts
from upcycle.moe.routers import Routing


@dataclass
class Dispatched:
    """A dispatcher's output and what it did."""

    out: torch.Tensor
    """[T, D] combined expert outputs."""
    kept: torch.Tensor
    """[N] bool: which routing assignments were processed (False: dropped for lack of capacity)."""
    sent: torch.Tensor
    """[E] long: assignments each expert processed."""
    capacity: int | None
    """Slots per expert (None for dropless)."""


def expert_capacity(factor: float, per_token: int, num_tokens: int, num_experts: int) -> int:
    """C = ceil(cf * k * T / E): the slots each expert offers."""
    return math.ceil(factor * per_token * num_tokens / num_experts)


class CapacityDispatcher(nn.Module):
    """Fixed C slots per expert, filled in routing priority order; assignments past C are dropped.

    Expert choice routings bring their own C (and never overflow it); for token choice C = ceil(cf * k * T / E) with
    T the real tokens, cf the training or evaluation factor.
    """

    def __init__(self, capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0) -> None:
        super().__init__()
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor

    def forward(self, x: torch.Tensor, routing: Routing, experts: SwiGLUExperts) -> Dispatched:
        """x [T, D] -> Dispatched with out [T, D].

        Legend: T tokens, D model dim, E experts, C capacity, N assignments, M kept assignments.
        """
        num_experts = experts.num_experts
        capacity = routing.capacity
        if capacity is None:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(factor, routing.per_token, routing.num_tokens, num_experts)

        # Position of each assignment in its expert's queue, counted in priority order.
        one_hot = F.one_hot(routing.expert, num_experts)  # [N, E]
        sent = one_hot.sum(dim=0).clamp(max=capacity)  # [E] the first C of each queue are kept
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # [N]
        kept = position < capacity  # [N]
        slot = routing.expert[kept] * capacity + position[kept]  # [M] row in the flat buffer
        token = routing.token[kept]  # [M]

        dim = x.shape[-1]
        buffer = x.new_zeros(num_experts * capacity, dim).index_copy(0, slot, x[token])  # [E*C, D]
        y = experts.forward_buffer(buffer.view(num_experts, capacity, dim)).view(num_experts * capacity, dim)
        gate = routing.gate[kept].to(y.dtype)[:, None]  # [M, 1]
        out = x.new_zeros(x.shape).index_add(0, token, y[slot] * gate)  # [T, D]
        return Dispatched(out=out, kept=kept, sent=sent, capacity=capacity)


class DroplessDispatcher(nn.Module):
    """No capacity: sort assignments by expert and run each expert on its contiguous segment (grouped matmul)."""

    def forward(self, x: torch.Tensor, routing: Routing, experts: SwiGLUExperts) -> Dispatched:
        """x [T, D] -> Dispatched with out [T, D].

        Legend: T tokens, D model dim, E experts, N assignments (all kept), S = N sorted rows.
        """
        order = torch.argsort(routing.expert, stable=True)  # [N] -> sorted by expert
        token = routing.token[order]  # [S]
        counts = torch.bincount(routing.expert, minlength=experts.num_experts)  # [E]
        y = experts.forward_sorted(x[token], counts)  # [S, D]
        gate = routing.gate[order].to(y.dtype)[:, None]  # [S, 1]
        out = x.new_zeros(x.shape).index_add(0, token, y * gate)  # [T, D]
        kept = torch.ones_like(routing.expert, dtype=torch.bool)
        return Dispatched(out=out, kept=kept, sent=counts, capacity=None)
