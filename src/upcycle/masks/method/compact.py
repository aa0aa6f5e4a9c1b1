"""Compaction: turn trained mask experts into a smaller FFN that skips what the masks switched off.

From each MaskedFFN's eval-mode gates z [E, I]:
- a neuron with the same non-zero value in every expert is used by every token with that value whatever the
  routing: it goes to the dense shared block;
- a neuron that is zero in every expert is never used: it is dropped;
- every other neuron stays routed, in the blocks of the experts that keep it.
This structural split is exact for every input. Given a `MaskAnalysis` of held-out tokens it goes further (top-k
routing only): experts no analysed token chose are removed from the router, and the neurons that the experts
every analysed token chose already supply at the union's value move to the shared block. That is exact for tokens
that route the way the analysed ones did (the equality test checks it on those tokens).

The compact layer is a router plus an `upcycle.ops.sparse_ffn.SparseFFN`. Legend: T tokens, D model dim,
I intermediate neurons, E experts.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from upcycle.masks.method.analysis import MaskAnalysis
from upcycle.masks.method.layer import MaskedFFN
from upcycle.masks.method.router import TokenRouter
from upcycle.masks.method.surgery import masked_ffns
from upcycle.models.surgery import replace_module
from upcycle.ops.sparse_ffn import SparseFFN

log = logging.getLogger(__name__)


class CompactFFN(nn.Module):
    """Router (optional: None for a static mask) + packed sparse FFN."""

    def __init__(self, router: TokenRouter | None, ffn: SparseFFN) -> None:
        super().__init__()
        self.router, self.ffn = router, ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]."""
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        if self.router is None:
            return self.ffn(flat).view(x.shape)
        if self.router.routing == "soft":
            return self.ffn.forward_mixture(flat, self.router(flat).weights.to(flat.dtype)).view(x.shape)
        return self.ffn(flat, self.router.choose(flat)).view(x.shape)

    @torch.no_grad()
    def active_fraction(self, x: torch.Tensor) -> float:
        """Mean fraction of the I neurons computed per token for x [T, D] (soft routing computes every block)."""
        if self.router is None:
            neurons = float(self.ffn.sizes[0])
        elif self.router.routing == "soft":
            neurons = float(self.ffn.sizes[0] + self.ffn.neuron[self.ffn.offsets[1]:].unique().numel())
        else:
            neurons = float(self.ffn.active_neurons(self.router.choose(x)).double().mean())
        return neurons / self.ffn.intermediate

    def layout(self) -> dict:
        """What a loader needs to rebuild an empty copy of this layer (stored in the compact model's config)."""
        router = self.router
        return {"hidden": self.ffn.hidden, "intermediate": self.ffn.intermediate, "sizes": self.ffn.sizes,
                "routing": router.routing if router else None, "top_k": router.top_k if router else 0,
                "router_bias": bool(router is not None and router.proj.bias is not None)}

    @classmethod
    def empty(cls, layout: dict, act, dtype: torch.dtype = torch.float32) -> CompactFFN:
        """An uninitialised layer with `layout` (see `layout`), to load a state dict into."""
        ffn = SparseFFN(layout["hidden"], layout["intermediate"], layout["sizes"], act, dtype)
        router = None
        if layout["routing"] is not None:
            router = TokenRouter(layout["hidden"], len(layout["sizes"]) - 1, layout["top_k"], layout["routing"],
                                 layout["router_bias"]).to(dtype)
        return cls(router, ffn)


@torch.no_grad()
def split_gates(gates: torch.Tensor, always: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split eval gate values z [E, I] into shared values [I] and routed values [E, I] with disjoint supports.

    Structural: a neuron equal and non-zero in every expert is shared. With `always` (experts every token uses),
    a neuron is also shared when those experts already supply its largest value, max_a z[a, i] = max_e z[e, i]:
    the union then takes that value whatever else a token chose.
    """
    top = gates.amax(dim=0)  # [I]
    shared_mask = (gates == gates[:1]).all(dim=0) & (top > 0)
    if always:
        shared_mask |= (gates[always].amax(dim=0) == top) & (top > 0)
    shared = torch.where(shared_mask, top, torch.zeros_like(top))
    routed = torch.where(shared_mask, torch.zeros_like(gates), gates)
    return shared, routed


@torch.no_grad()
def _layer_split(layer: MaskedFFN, drop: list[int] | None, always: list[int] | None
                 ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(experts kept, shared values [I], routed values [E', I]) of one MaskedFFN as `compact_layer` packs it."""
    drop = sorted(set(drop or []))
    keep = [e for e in range(layer.num_experts) if e not in drop]
    if len(keep) < layer.router.top_k:  # top-k needs k experts to choose from; keep the unused ones then
        keep = list(range(layer.num_experts))
    gates = layer.eval_gates()[keep]  # [E', I]
    always = [keep.index(e) for e in (always or []) if e in keep]
    shared, routed = split_gates(gates, always)
    return keep, shared, routed


def packed_rows(model: nn.Module, analysis: MaskAnalysis | None = None) -> tuple[int, int]:
    """(rows the compact FFNs would store, rows of the dense FFNs) over every MaskedFFN of `model`.

    A neuron that several experts keep (and that is not shared) is stored once per expert, so that each expert is
    one contiguous block; with many overlapping experts the compact model can be far larger than the dense one.
    """
    unused = analysis.unused_experts() if analysis else {}
    always = analysis.always_used_experts() if analysis else {}
    packed = dense = 0
    for name, layer in masked_ffns(model):
        topk = layer.router.routing == "topk"
        _, shared, routed = _layer_split(layer, unused.get(name) if topk else None, always.get(name) if topk else None)
        packed += int((shared != 0).sum()) + int((routed != 0).sum())
        dense += layer.intermediate_size
    return packed, dense


@torch.no_grad()
def compact_layer(layer: MaskedFFN, drop: list[int] | None = None, always: list[int] | None = None) -> CompactFFN:
    """Compact one MaskedFFN; `drop` experts leave the router, `always` experts feed the shared block."""
    keep, shared, routed = _layer_split(layer, drop, always)
    router = layer.router
    dtype = layer.gate_proj.weight.dtype
    ffn = SparseFFN.from_dense(layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight,
                               shared.to(dtype), routed.to(dtype), layer.act_fn)
    compact_router = TokenRouter(router.proj.in_features, len(keep), router.top_k, router.routing,
                                 router.proj.bias is not None).to(router.proj.weight.device, router.proj.weight.dtype)
    compact_router.proj.weight.copy_(router.proj.weight[keep])
    if router.proj.bias is not None:
        compact_router.proj.bias.copy_(router.proj.bias[keep])
    return CompactFFN(compact_router, ffn)


def compact_model(model: nn.Module, analysis: MaskAnalysis | None = None) -> dict[str, dict]:
    """Replace every MaskedFFN of `model` by its CompactFFN (in place). Returns each layer's layout.

    Without `analysis` the result equals the masked model (eval mode) on every input; with it, on tokens that
    route like the analysed ones (see module docstring). Soft-routed layers are only compacted structurally:
    removing an expert would change every token's softmax.
    """
    layouts = {}
    unused = analysis.unused_experts() if analysis else {}
    always = analysis.always_used_experts() if analysis else {}
    for name, layer in masked_ffns(model):
        topk = layer.router.routing == "topk"
        compact = compact_layer(layer, unused.get(name) if topk else None, always.get(name) if topk else None)
        replace_module(model, name, compact)
        layouts[name] = compact.layout()
        sizes = compact.ffn.sizes
        log.info("%s: %d shared + %d routed rows over %d experts (of %d neurons)", name, sizes[0], sum(sizes[1:]),
                 len(sizes) - 1, layer.intermediate_size)
    return layouts


def compact_layers(model: nn.Module) -> list[tuple[str, CompactFFN]]:
    """(name, layer) of every CompactFFN in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, CompactFFN)]
