"""The trainer-owned channel between a model's MoE layers and the loss: padding mask in, aux losses and stats out.

Nothing is kept in module globals: the collector exists only inside `with collect_routing(model, mask) as c:`, and
each forward through the model appends one record per MoE layer to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.moe.layer import MoELayer, MoEOutput
from upcycle.moe.losses import AuxLosses, combine_aux_losses
from upcycle.moe.stats import RoutingStats


@dataclass
class LayerRecord:
    """One MoE layer's contribution to one forward pass."""

    name: str
    aux: AuxLosses
    stats: RoutingStats | None


class RoutingCollector:
    """Carries the batch's padding mask into every MoE layer and collects what each layer returns."""

    def __init__(self, padding_mask: torch.Tensor | None = None) -> None:
        self.padding_mask = padding_mask
        self.records: list[LayerRecord] = []

    def record(self, name: str, output: MoEOutput) -> None:
        self.records.append(LayerRecord(name=name, aux=output.aux, stats=output.stats))

    def aux_loss(self, balance_coef: float, z_coef: float) -> torch.Tensor:
        """alpha * mean over layers of the balance loss + beta * mean over layers of the z-loss."""
        return combine_aux_losses([r.aux for r in self.records], balance_coef, z_coef)

    def metrics(self, per_layer: bool = False) -> dict[str, float]:
        """Scalars for the training log: losses and routing statistics averaged over layers (and per layer)."""
        if not self.records:
            return {}
        out: dict[str, float] = {
            "moe/balance_loss": float(torch.stack([r.aux.balance.detach() for r in self.records]).mean()),
            "moe/z_loss": float(torch.stack([r.aux.z.detach() for r in self.records]).mean()),
        }
        stats = [r.stats.to_dict() for r in self.records if r.stats is not None]
        for key in ("dropped_fraction", "unrouted_fraction", "entropy", "utilisation_max", "utilisation_min"):
            if stats:
                out[f"moe/{key}"] = sum(s[key] for s in stats) / len(stats)
        if per_layer:
            for record in self.records:
                if record.stats is not None:
                    for key, value in record.stats.to_dict().items():
                        if not isinstance(value, list):
                            out[f"moe/{record.name}/{key}"] = value
        return out


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """The model's MoE layers by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}


@contextlib.contextmanager
def collect_routing(model: nn.Module, padding_mask: torch.Tensor | None = None) -> Iterator[RoutingCollector]:
    """Attach a fresh collector to every MoE layer of `model` for the block, detach it afterwards.

    padding_mask: the batch's attention mask [B, S] (1 real, 0 padding), matching the hidden states the layers see.
    """
    collector = RoutingCollector(padding_mask)
    layers = moe_layers(model)
    for name, layer in layers.items():
        layer.collector, layer.layer_name = collector, name
    try:
        yield collector
    finally:
        for layer in layers.values():
            layer.collector = None
