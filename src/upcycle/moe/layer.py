"""The MoE layer: a router, experts and a dispatcher composed; a drop-in replacement for a dense MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from upcycle.moe.config import MoEConfig
from upcycle.moe.dispatch import CapacityDispatcher, DroplessDispatcher
from upcycle.moe.experts import SwiGLUExperts
from upcycle.moe.losses import AuxLosses, routing_losses
from upcycle.moe.routers import ExpertChoiceRouter, Routing, TopKRouter
from upcycle.moe.stats import RoutingStats, routing_stats


@dataclass
class MoEOutput:
    """Everything one MoE layer computed for one batch."""

    hidden: torch.Tensor
    """[..., D] the layer output, shaped like its input."""
    aux: AuxLosses
    """Unweighted auxiliary losses (they keep the router's graph)."""
    stats: RoutingStats | None
    """Routing statistics, None when the layer does not collect them."""
    routing: Routing
    """The routing itself, for inspection and tests."""


class RoutingSink(Protocol):
    """What a layer needs from the trainer's collector (`upcycle.moe.collector.RoutingCollector` is the one)."""

    padding_mask: torch.Tensor | None

    def record(self, name: str, output: MoEOutput) -> None: ...


class MoELayer(nn.Module):
    """y = sum over the experts a token reaches of gate * expert(x); x [..., D] -> [..., D].

    `forward` returns only the tensor so the layer can sit where a Hugging Face decoder layer calls `self.mlp(h)`;
    its auxiliary losses and statistics go to the `RoutingCollector` the trainer attached (see `collect_routing`),
    which also brings the padding mask in. `forward_with_aux` returns them directly.
    """

    def __init__(self, router: nn.Module, experts: SwiGLUExperts, dispatcher: nn.Module,
                 collect_stats: bool = True) -> None:
        super().__init__()
        self.router, self.experts, self.dispatcher = router, experts, dispatcher
        self.collect_stats = collect_stats
        self.collector: RoutingSink | None = None
        self.layer_name = ""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        collector = self.collector
        output = self.forward_with_aux(hidden, collector.padding_mask if collector is not None else None)
        if collector is not None:
            collector.record(self.layer_name, output)
        return output.hidden

    def forward_with_aux(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> MoEOutput:
        """hidden [..., D], padding_mask [...] (1 real, 0 padding; None: all real) -> MoEOutput."""
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, D]
        valid = None
        if padding_mask is not None:
            if padding_mask.numel() != x.shape[0]:
                raise ValueError(f"padding mask has {padding_mask.numel()} entries for {x.shape[0]} tokens")
            valid = padding_mask.reshape(-1).to(device=x.device, dtype=torch.bool)  # [T]
        routing = self.router(x, valid)
        dispatched = self.dispatcher(x, routing, self.experts)
        stats = routing_stats(routing, dispatched) if self.collect_stats else None
        return MoEOutput(hidden=dispatched.out.view_as(hidden), aux=routing_losses(routing), stats=stats,
                         routing=routing)


def build_router(config: MoEConfig, dim: int) -> nn.Module:
    """The router `config.router` names, for model dim `dim`."""
    if config.router == "expert_choice":
        return ExpertChoiceRouter(dim, config.num_experts, config.capacity_factor, config.eval_capacity_factor,
                                  config.jitter_noise, config.router_init_std)
    return TopKRouter(dim, config.num_experts, config.top_k, config.normalize_gates, config.jitter_noise,
                      config.second_expert_policy, config.router_init_std)


def build_dispatcher(config: MoEConfig) -> nn.Module:
    """The dispatcher `config.dispatch` names."""
    if config.dispatch == "capacity":
        return CapacityDispatcher(config.capacity_factor, config.eval_capacity_factor)
    return DroplessDispatcher()


def build_moe_layer(config: MoEConfig, dim: int, ffn_dim: int, activation: str = "silu",
                    collect_stats: bool = True) -> MoELayer:
    """A freshly initialised MoE layer with E experts of FFN width `ffn_dim`."""
    experts = SwiGLUExperts(config.num_experts, dim, ffn_dim, activation, config.grouped_backend)
    return MoELayer(build_router(config, dim), experts, build_dispatcher(config), collect_stats)
