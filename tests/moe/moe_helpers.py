"""Small builders shared by the MoE tests."""

from __future__ import annotations

import torch

from upcycle.moe.config import MoEConfig
from upcycle.moe.layer import MoELayer, build_moe_layer


def make_layer(router: str = "gshard", dispatch: str = "dropless", experts: int = 4, dim: int = 8, ffn: int = 6,
               dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> MoELayer:
    """A randomly initialised MoE layer in `dtype`, router weights large enough that choices are clear-cut."""
    torch.manual_seed(seed)
    config = MoEConfig(num_experts=experts, router=router, dispatch=dispatch, router_init_std=1.0, **overrides)
    layer = build_moe_layer(config, dim, ffn).to(dtype)
    with torch.no_grad():
        layer.experts.w_in.normal_(std=0.5)
        layer.experts.w_out.normal_(std=0.5)
    return layer


def leaf_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies that require grad, to run a reference on the same values."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def padding_mask(tokens: int, pad: int) -> torch.Tensor | None:
    """[tokens] mask with the last `pad` entries 0 (None when pad is 0)."""
    if pad == 0:
        return None
    mask = torch.ones(tokens)
    mask[tokens - pad:] = 0
    return mask
