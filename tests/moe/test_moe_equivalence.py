"""Equivalences: one expert = the dense MLP, dropless = capacity with room for all, ours = transformers' Mixtral."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import make_layer

from upcycle.moe.config import MoEConfig
from upcycle.moe.mixtral import layer_from_mixtral_block
from upcycle.ops.reference_moe import reference_dense_swiglu


@pytest.mark.parametrize("router", ["switch", "gshard", "st_moe", "expert_choice"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_one_expert_equals_the_dense_mlp(router, dispatch):
    # One expert, gates renormalised: every token goes to it with gate 1 (expert choice: C = T at cf = 1).
    top_k = None if router == "expert_choice" else 1
    layer = make_layer(router, dispatch, experts=1, top_k=top_k, normalize_gates=True, capacity_factor=1.0).train()
    gate, up = layer.experts.w_in[0].T.chunk(2, dim=0)  # nn.Linear layout [F, D] each
    down = layer.experts.w_out[0].T  # [D, F]
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_dense_swiglu(x, gate, up, down), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("router", ["switch", "gshard", "st_moe", "expert_choice"])
def test_dropless_equals_capacity_dispatch_when_nothing_is_dropped(router):
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    outputs, grads = [], []
    for dispatch in ["dropless", "capacity"]:
        layer = make_layer(router, dispatch, experts=4, capacity_factor=4.0).train()  # C >= every token
        output = layer.forward_with_aux(x)
        assert output.stats.dropped == 0
        outputs.append(output.hidden)
        grads.append(torch.autograd.grad(output.hidden.square().sum(), [x, *layer.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_matches_transformers_mixtral_block(implementation, dispatch):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=0.3)
    moe = MoEConfig(num_experts=4, router="top2", dispatch=dispatch, eval_capacity_factor=4.0)  # nothing dropped
    layer = layer_from_mixtral_block(block, moe).eval()
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(x), block(x.clone()), rtol=1e-5, atol=1e-5)
