"""Sparse mixtures of experts (Flan-MoE): routers, dispatch, aux losses, routing statistics, sparse upcycling.

    from upcycle.moe import MoEConfig, UpcycleConfig, upcycle_model, collect_routing

    moe = MoEConfig(num_experts=8, router="st_moe", dispatch="capacity")
    layers = upcycle_model(hf_llama, moe, UpcycleConfig(every=2))
    with collect_routing(hf_llama, padding_mask=attention_mask) as routing:
        loss = hf_llama(input_ids=ids, attention_mask=attention_mask, labels=labels).loss
    loss = loss + routing.aux_loss(moe.balance_loss_coef, moe.z_loss_coef)

Reading order:
- `config`                 MoEConfig, UpcycleConfig (torch-free), the experiment's conditions and metrics
- `routers`, `experts`, `dispatch`, `layer`   token / expert choice, stacked SwiGLU experts, capacity or dropless
                           dispatch, and MoELayer(router, experts, dispatcher) composed
- `losses`, `stats`, `collector`   aux losses and routing statistics, returned through the trainer-owned collector
- `upcycling`, `checkpoint`, `mixtral`   dense -> MoE surgery, our checkpoint format, Mixtral interchange
- `train`, `instruct`, `experiment`, `experiment_report`   training, the Flan-MoE recipes, experiment and report
- `commands`               the CLI

Names are imported lazily so that `upcycle.moe.config` (and the CLI's --help) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MoEConfig": "config", "UpcycleConfig": "config",
    "MoELayer": "layer", "MoEOutput": "layer", "build_moe_layer": "layer",
    "Routing": "routers", "TopKRouter": "routers", "ExpertChoiceRouter": "routers",
    "SwiGLUExperts": "experts",
    "CapacityDispatcher": "dispatch", "DroplessDispatcher": "dispatch",
    "AuxLosses": "losses", "load_balancing_loss": "losses", "router_z_loss": "losses",
    "combine_aux_losses": "losses",
    "RoutingStats": "stats", "routing_stats": "stats",
    "RoutingCollector": "collector", "collect_routing": "collector", "moe_layers": "collector",
    "upcycle_model": "upcycling", "moe_layer_indices": "upcycling",
    "save_moe_model": "checkpoint", "load_moe_model": "checkpoint",
    "export_mixtral": "mixtral", "to_mixtral": "mixtral",
    "train_moe": "train", "moe_loss_fn": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'upcycle.moe' has no attribute {name!r}")
    return getattr(importlib.import_module(f"upcycle.moe.{_EXPORTS[name]}"), name)
