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
        slot = routing.expert * capacity + position  # [N] row in the flat [E*C, D] buffer (valid where kept)
        if routing.complete and bool(kept.all()):
            out = _through_rows(x, routing, slot, num_experts * capacity, _buffer_run(experts, capacity))
            return Dispatched(out=out, kept=kept, sent=sent, capacity=capacity)

        slot, token = slot[kept], routing.token[kept]  # [M] each
        dim = x.shape[-1]
        buffer = x.new_zeros(num_experts * capacity, dim).index_copy(0, slot, x[token])  # [E*C, D]
        y = experts.forward_buffer(buffer.view(num_experts, capacity, dim)).view(num_experts * capacity, dim)
        gate = routing.gate[kept].to(y.dtype)[:, None]  # [M, 1]
        out = x.new_zeros(x.shape).index_add(0, token, y[slot] * gate)  # [T, D]
        return Dispatched(out=out, kept=kept, sent=sent, capacity=capacity)


class DroplessDispatcher(nn.Module):
    """No capacity: sort assignments by expert and run each expert on its contiguous segment (grouped matmul).

    Where the experts' backend pads segments into one batched matmul (the CPU default), the rows go straight into
    the padded [E, C, D] buffer with C = the fullest expert's count: capacity dispatch with room for every token.
    """

    def forward(self, x: torch.Tensor, routing: Routing, experts: SwiGLUExperts) -> Dispatched:
        """x [T, D] -> Dispatched with out [T, D].

        Legend: T tokens, D model dim, E experts, N assignments (all kept), S = N sorted rows, C rows per expert.
        """
        num_experts = experts.num_experts
        counts = torch.bincount(routing.expert, minlength=num_experts)  # [E]
        order = torch.argsort(routing.expert, stable=True)  # [S] the assignment each sorted row holds
        kept = torch.ones_like(routing.expert, dtype=torch.bool)
        if routing.complete:
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))  # [N]
            if experts.pads(x, counts):
                capacity = int(counts.max())
                first = counts.cumsum(0) - counts  # [E] sorted row where each expert's segment starts
                slot = routing.expert * capacity + rank - first[routing.expert]  # [N] row in [E*C, D]
                out = _through_rows(x, routing, slot, num_experts * capacity, _buffer_run(experts, capacity))
            else:
                out = _through_rows(x, routing, rank, order.numel(), lambda rows: experts.forward_sorted(rows, counts))
            return Dispatched(out=out, kept=kept, sent=counts, capacity=None)

        token = routing.token[order]  # [S]
        y = experts.forward_sorted(x[token], counts)  # [S, D]
        gate = routing.gate[order].to(y.dtype)[:, None]  # [S, 1]
        out = x.new_zeros(x.shape).index_add(0, token, y * gate)  # [T, D]
        return Dispatched(out=out, kept=kept, sent=counts, capacity=None)


def _buffer_run(experts: SwiGLUExperts, capacity: int):
    """[E*C, D] -> [E*C, D], expert e on rows [e*C, (e+1)*C): the flat form of forward_buffer."""
    return lambda rows: experts.forward_buffer(rows.view(experts.num_experts, capacity, rows.shape[-1])).view_as(rows)


def _through_rows(x: torch.Tensor, routing: Routing, slot: torch.Tensor, rows: int, run) -> torch.Tensor:
    """For a complete routing: put assignment n's token into row slot[n] of a [R, D] buffer (other rows 0), apply
    `run` ([R, D] -> [R, D]), and return sum over each token's K assignments of gate * its row of the result.

    Assignment n is token n % T, so both moves are gathers (rows by slot, and back), never a scatter-add.
    Legend: T tokens, D model dim, K choices per token, N = K * T assignments, R buffer rows (slot is injective).
    """
    tokens, choices, dim = x.shape[0], routing.per_token, x.shape[-1]
    y = run(_ScatterRows.apply(x, slot.view(choices, tokens), rows)).reshape(rows, dim)  # [R, D]
    y = _GatherRows.apply(y, slot).view(choices, tokens, dim)  # [K, T, D] in assignment order
    return (y * routing.gate.to(y.dtype).view(choices, tokens, 1)).sum(dim=0)  # [T, D]


class _ScatterRows(torch.autograd.Function):
    """x [T, D] written K times into a zero [R, D] buffer: copy k of token t to row slot[k, t] (slot [K, T]).

    The backward gathers each token's K rows and sums them: no scatter-add.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(slot)
        buffer = x.new_zeros(rows, x.shape[-1])  # [R, D]
        for block in slot:  # [T] the slots of one choice
            buffer.index_copy_(0, block, x)
        return buffer

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slot,) = ctx.saved_tensors
        picked = grad.index_select(0, slot.reshape(-1)).view(*slot.shape, grad.shape[-1])  # [K, T, D]
        return picked.sum(dim=0), None, None


class _GatherRows(torch.autograd.Function):
    """rows[slot] for an injective `slot`; the backward writes the gradient back to those rows (no accumulation)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(slot)
        ctx.rows = rows.shape[0]
        return rows.index_select(0, slot)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slot,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[-1]).index_copy_(0, slot, grad), None
