"""Routing statistics of one layer and step: load per expert, drops, utilisation, router entropy.

Computed without gradient from tensors the layer already has, and kept as tensors (no device sync) until
`to_dict` is called. Invariant for token-choice routing: sent + dropped + skipped = k * tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from upcycle.moe.dispatch import Dispatched
from upcycle.moe.routers import Routing


@dataclass
class RoutingStats:
    """What one MoE layer did with one batch. Counts are assignments (token, expert) unless named otherwise."""

    tokens: torch.Tensor
    """Real (non-padding) tokens routed."""
    per_token: int | None
    """k for token-choice routing, None for expert choice."""
    routed: torch.Tensor
    """[E] the router's top-k choices per expert (token choice) or its picks (expert choice)."""
    sent: torch.Tensor
    """[E] assignments the experts processed."""
    dropped: torch.Tensor
    """Assignments dropped because their expert was full."""
    skipped: torch.Tensor
    """Choices the random second-expert policy did not send."""
    unrouted: torch.Tensor
    """Real tokens that reached no expert (their layer output is 0; the residual carries them)."""
    capacity: int | None
    """Slots per expert, None for dropless dispatch."""
    entropy: torch.Tensor
    """Mean router entropy over real tokens, in nats (log E is uniform)."""

    @property
    def utilisation(self) -> torch.Tensor:
        """[E] tokens dispatched to each expert / its capacity. Dropless has no capacity: the balanced share
        k * tokens / E stands in for it, so 1 is a perfectly balanced load there too."""
        sent = self.sent.float()
        slots = sent.new_tensor(float(self.capacity)) if self.capacity is not None else sent.mean()
        return sent / slots.clamp_min(1e-9)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """Share of the router's assignments that no expert processed (capacity drops + policy skips)."""
        total = self.sent.sum() + self.dropped + self.skipped
        return (self.dropped + self.skipped).float() / total.clamp_min(1).float()

    def to_dict(self) -> dict[str, float | list[float]]:
        """Plain numbers for logging (this is where the values are read back from the device)."""
        return {
            "tokens": int(self.tokens),
            "dropped_fraction": float(self.dropped_fraction),
            "unrouted_fraction": float(self.unrouted.float() / self.tokens.clamp_min(1).float()),
            "entropy": float(self.entropy),
            "utilisation_max": float(self.utilisation.max()),
            "utilisation_min": float(self.utilisation.min()),
            "tokens_per_expert": [int(v) for v in self.sent.tolist()],
            "utilisation": [round(float(v), 4) for v in self.utilisation.tolist()],
        }


@torch.no_grad()
def routing_stats(routing: Routing, dispatched: Dispatched) -> RoutingStats:
    """Statistics of one layer's routing and dispatch, from counts (bincount) rather than masked indexing so the
    cost stays a few small kernels.

    Legend: T tokens, E experts, K experts per token, N assignments.
    """
    num_tokens, num_experts = routing.probs.shape
    valid = routing.valid
    tokens = routing.probs.new_tensor(num_tokens, dtype=torch.long) if valid is None else valid.sum()
    sent = dispatched.sent
    dropped = routing.expert.numel() - sent.sum()
    if routing.choices is not None:
        choice_weight = None if valid is None else valid[:, None].expand_as(routing.choices).reshape(-1).float()
        routed = torch.bincount(routing.choices.reshape(-1), choice_weight, minlength=num_experts).long()  # [E]
        skipped = tokens * routing.per_token - routing.expert.numel()  # choices the routing left out for real tokens
    else:
        routed, skipped = torch.bincount(routing.expert, minlength=num_experts), tokens.new_zeros(())
    reached = torch.bincount(routing.token, dispatched.kept.float(), minlength=num_tokens)  # [T] experts per token
    unrouted = (reached == 0).sum() if valid is None else ((reached == 0) & valid).sum()
    entropy_per_token = -torch.special.xlogy(routing.probs, routing.probs).sum(dim=-1)  # [T]
    entropy = entropy_per_token.mean() if valid is None else (entropy_per_token * valid).sum() / tokens.clamp_min(1)
    return RoutingStats(tokens=tokens, per_token=routing.per_token, routed=routed, sent=sent, dropped=dropped,
                        skipped=skipped, unrouted=unrouted, capacity=dispatched.capacity, entropy=entropy)
