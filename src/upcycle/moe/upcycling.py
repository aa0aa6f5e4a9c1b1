"""Sparse upcycling (Komatsuzaki et al. 2022): replace dense MLPs of a Hugging Face causal LM by MoE layers whose
experts start as copies of the MLP, so the model starts where the dense one was.

Plain functions that walk `named_modules` and swap modules in place; nothing subclasses the HF model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.models.surgery import FFN_PROJECTIONS, check_supported, decoder_mlps, replace_module
from upcycle.moe.config import MoEConfig, UpcycleConfig
from upcycle.moe.layer import MoELayer, build_moe_layer

log = logging.getLogger(__name__)

def moe_layer_indices(num_layers: int, every: int) -> list[int]:
    """Decoder layers whose MLP becomes MoE: every N-th, counting from 1 (every=2: layers 1, 3, 5, ...)."""
    return [i for i in range(num_layers) if i % every == every - 1]


def upcycle_mlp(mlp: nn.Module, moe: MoEConfig, activation: str, noise: float = 0.0,
                generator: torch.Generator | None = None) -> MoELayer:
    """An MoE layer whose E experts copy the dense SwiGLU `mlp` (gate_proj, up_proj, down_proj), plus a new router.

    noise > 0 adds N(0, (noise * std(W))^2) to every copy of every weight W, independently per expert.
    """
    gate, up, down = (getattr(mlp, name).weight for name in FFN_PROJECTIONS)
    layer = build_moe_layer(moe, dim=gate.shape[1], ffn_dim=gate.shape[0], activation=activation)
    layer.to(device=gate.device, dtype=gate.dtype)
    for expert in range(moe.num_experts):
        copies = [w.detach() + _noise_like(w, noise, generator) for w in (gate, up, down)]
        layer.experts.load_dense(*copies, expert=expert)
    return layer


def upcycle_model(model: nn.Module, moe: MoEConfig, upcycle: UpcycleConfig | None = None) -> list[int]:
    """Replace every N-th dense MLP of `model` (in place) by an upcycled MoE layer; returns the layer indices.

    Routers are initialised from `upcycle.seed`, independently of the global RNG. With noise 0, top-k routing with
    renormalised gates (the default for switch, gshard and st_moe) and no dropped tokens, the logits equal the
    dense model's at step 0.
    """
    upcycle = upcycle or UpcycleConfig()
    check_supported(model)
    mlps = decoder_mlps(model)
    indices = moe_layer_indices(len(mlps), upcycle.every)
    if not indices:
        raise UserError(f"every={upcycle.every} selects none of the model's {len(mlps)} layers; use a smaller value")
    activation = model.config.hidden_act
    generator = torch.Generator().manual_seed(upcycle.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(upcycle.seed)
        for index in indices:
            name = mlps[index]
            layer = upcycle_mlp(model.get_submodule(name), moe, activation, upcycle.noise, generator)
            replace_module(model, name, layer, keep_mode=True)  # capacity factor and jitter depend on the mode
    log.info("upcycled %d of %d MLPs into %d experts each", len(indices), len(mlps), moe.num_experts)
    return indices


def install_moe_layers(model: nn.Module, moe: MoEConfig, indices: list[int]) -> None:
    """Put freshly initialised MoE layers at `indices` (the structure a saved checkpoint's weights load into)."""
    check_supported(model)
    mlps = decoder_mlps(model)
    missing = [i for i in indices if i not in mlps]
    if missing:
        raise UserError(f"the checkpoint has MoE layers {missing} but the base has only {len(mlps)} layers")
    for index in indices:
        dense = model.get_submodule(mlps[index])
        dim, ffn_dim = dense.gate_proj.in_features, dense.gate_proj.out_features
        layer = build_moe_layer(moe, dim, ffn_dim, model.config.hidden_act)
        layer = layer.to(device=dense.gate_proj.weight.device, dtype=dense.gate_proj.weight.dtype)
        replace_module(model, mlps[index], layer, keep_mode=True)


def _noise_like(weight: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    if scale == 0:
        return torch.zeros_like(weight)
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    return (noise * scale * weight.detach().float().std()).to(device=weight.device, dtype=weight.dtype)
