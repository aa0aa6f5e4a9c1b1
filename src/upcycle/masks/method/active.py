"""The expected active ratio ŝ of a masked model, collected during a forward pass by a collector the caller owns.

ŝ is the fraction of FFN neurons a token is expected to use, averaged over tokens and layers (layers weighted by
their width). The layers do not stash it: the collector's forward hooks ask each MaskedFFN for it, from the same
input, while the caller's forward runs, and the caller gets it back as a differentiable tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from upcycle.masks.method.surgery import masked_ffns


class ActiveRatio:
    """Per-layer expected active ratios gathered during one forward pass."""

    def __init__(self) -> None:
        self.ratios: list[torch.Tensor] = []
        self.widths: list[int] = []

    def add(self, ratio: torch.Tensor, width: int) -> None:
        self.ratios.append(ratio)
        self.widths.append(width)

    def ratio(self) -> torch.Tensor:
        """Width-weighted mean over the layers seen (a differentiable scalar)."""
        if not self.ratios:
            raise RuntimeError("no masked FFN ran inside collect_expected_active(); is the model masked?")
        widths = torch.tensor(self.widths, dtype=torch.float32, device=self.ratios[0].device)
        return (torch.stack(self.ratios).float() * widths).sum() / widths.sum()


@contextlib.contextmanager
def collect_expected_active(model: nn.Module) -> Iterator[ActiveRatio]:
    """Within the block, every MaskedFFN forward adds its expected active ratio to the yielded collector."""
    collector = ActiveRatio()
    handles = [layer.register_forward_hook(
        lambda module, args, output: collector.add(module.expected_active(args[0]), module.intermediate_size))
        for _, layer in masked_ffns(model)]
    try:
        yield collector
    finally:
        for handle in handles:
            handle.remove()
