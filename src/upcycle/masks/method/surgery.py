"""Install mask-expert layers in a decoder's SwiGLU FFNs (found and swapped by `upcycle.models.surgery`), and move
their state in and out."""

from __future__ import annotations

import logging

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.masks.config import MaskConfig
from upcycle.masks.method.layer import MaskedFFN
from upcycle.models.surgery import find_ffns, replace_module

log = logging.getLogger(__name__)

MASK_KEYS = ("router.", "gates.")
"""State-dict key fragments that belong to the masks (everything else is the base model's)."""


def add_masks(model: nn.Module, config: MaskConfig, seed: int = 0) -> list[str]:
    """Wrap every SwiGLU FFN of `model` in a MaskedFFN (in place). Returns the wrapped module names."""
    if masked_ffns(model):
        raise UserError("this model already has mask experts; load the base model again to start over")
    torch.manual_seed(seed)
    names = []
    for name, mlp in find_ffns(model):
        replace_module(model, name, MaskedFFN.wrap(mlp, config))
        names.append(name)
    log.info("added %d mask experts to %d FFN layers", config.experts, len(names))
    return names


def masked_ffns(model: nn.Module) -> list[tuple[str, MaskedFFN]]:
    """(name, layer) of every MaskedFFN in `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedFFN)]


def mask_parameters(model: nn.Module, routers: bool = True) -> list[nn.Parameter]:
    """The mask parameters: every gate's log α, then (with `routers`) every router's weights."""
    layers = [layer for _, layer in masked_ffns(model)]
    gates = [p for layer in layers for p in layer.gates.parameters()]
    return gates + [p for layer in layers for p in layer.router.parameters()] if routers else gates


def ffn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The masked layers' FFN weights (gate, up and down projections), for fine-tuning them with the masks."""
    return [p for _, layer in masked_ffns(model)
            for proj in (layer.gate_proj, layer.up_proj, layer.down_proj) for p in proj.parameters()]


def mask_state_dict(model: nn.Module, ffn: bool = False) -> dict[str, torch.Tensor]:
    """Only the masks' tensors (router and gates), keyed as in model.state_dict(); with `ffn` also the masked
    layers' FFN weights (a run that fine-tuned them)."""
    prefixes = tuple(f"{name}.{proj}." for name, _ in masked_ffns(model) for proj in ("gate_proj", "up_proj",
                                                                                        "down_proj")) if ffn else ()
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if any(f in k for f in MASK_KEYS) or k.startswith(prefixes)}


def load_mask_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the masks",
                    ffn: bool = False) -> None:
    """Load router and gate tensors (and with `ffn` the FFN weights) saved by `mask_state_dict`, checking they fit
    this model's masked layers."""
    own = mask_state_dict(model, ffn)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"{source} do not fit this model ({len(missing)} tensors missing, {len(unexpected)} "
                        f"unexpected, e.g. {example}); use the base model the masks were trained on")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"{source} do not fit this model: {key} is {tuple(value.shape)} there and "
                            f"{tuple(own[key].shape)} here; use the base model the masks were trained on")
    model.load_state_dict(state, strict=False)
