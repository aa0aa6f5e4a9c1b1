"""MaskedFFN and the surgery that installs it: equivalence with the dense model, mask semantics, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.masks.mask_helpers import randomize_gates, tiny_decoder
from upcycle.errors import UserError
from upcycle.masks.config import MaskConfig
from upcycle.masks.method.active import collect_expected_active
from upcycle.masks.method.surgery import add_masks, load_mask_state, mask_parameters, mask_state_dict, masked_ffns
from upcycle.ops.reference_ffn import mixture_mask, reference_masked_ffn, union_mask

TOKENS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_step_zero_equals_dense_model(kind):
    model = tiny_decoder(kind)
    dense = model(input_ids=TOKENS).logits
    names = add_masks(model, MaskConfig(experts=4, top_k=2))
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    torch.testing.assert_close(model.eval()(input_ids=TOKENS).logits, dense, rtol=0, atol=0)


@pytest.mark.parametrize(("routing", "k"), [("topk", 1), ("topk", 3), ("soft", 1)])
def test_layer_matches_reference_mask_semantics(routing, k):
    model = tiny_decoder(dtype=torch.float64)
    add_masks(model, MaskConfig(experts=4, top_k=k, routing=routing))
    randomize_gates(model)
    layer = masked_ffns(model)[0][1].eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    flat = x.reshape(10, 32)
    z = layer.eval_gates()
    assert ((z > 0) & (z < 1)).any() and (z == 0).any() and (z == 1).any()
    routing_out = layer.router(flat)
    no_shared = torch.zeros(64, dtype=torch.float64)
    if routing == "soft":
        mask = mixture_mask(no_shared, z, routing_out.probs.double())
    else:
        assert torch.equal(routing_out.expert_idx, routing_out.probs.topk(k).indices)
        mask = union_mask(no_shared, z, routing_out.expert_idx)
    want = reference_masked_ffn(flat, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight, mask)
    torch.testing.assert_close(layer(x), want.view(2, 5, 32))


def test_expected_active_matches_a_loop():
    model = tiny_decoder(dtype=torch.float64)
    add_masks(model, MaskConfig(experts=3, top_k=2))
    randomize_gates(model)
    layer = masked_ffns(model)[1][1]
    x = torch.randn(4, 32, dtype=torch.float64)
    routing, l0 = layer.router(x), layer.gates.expected_l0().detach()
    total = 0.0
    for t in range(4):
        for i in range(64):
            p_off = 1.0
            for e in routing.expert_idx[t].tolist():
                p_off *= 1.0 - float(l0[e, i])
            total += 1.0 - p_off
    assert float(layer.expected_active(x).detach()) == pytest.approx(total / (4 * 64), rel=1e-9)


def test_loss_reaches_gates_and_router_and_collector_reports_ratio():
    model = tiny_decoder()
    add_masks(model, MaskConfig(experts=4, top_k=1, init_log_alpha=0.5))
    model.train()
    with collect_expected_active(model) as collected:
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
    ratio = collected.ratio()
    assert len(collected.ratios) == 2 and 0.0 < float(ratio.detach()) < 1.0
    (loss + ratio).backward()
    for param in mask_parameters(model):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_mask_state_round_trip_and_mismatch():
    model = tiny_decoder()
    add_masks(model, MaskConfig(experts=4))
    randomize_gates(model, seed=3)
    state = mask_state_dict(model)
    assert set(state) == {f"model.layers.{i}.mlp.{k}" for i in range(2)
                          for k in ("router.proj.weight", "router.proj.bias", "gates.log_alpha")}
    other = tiny_decoder(seed=1)
    add_masks(other, MaskConfig(experts=4))
    load_mask_state(other, state)
    assert all(torch.equal(v, mask_state_dict(other)[k]) for k, v in state.items())

    wider = tiny_decoder(intermediate_size=96)
    add_masks(wider, MaskConfig(experts=4))
    with pytest.raises(UserError, match="do not fit this model"):
        load_mask_state(wider, state)
    fewer = tiny_decoder()
    add_masks(fewer, MaskConfig(experts=2))
    with pytest.raises(UserError, match="do not fit this model"):
        load_mask_state(fewer, state)


def test_models_without_a_swiglu_ffn_are_refused():
    with pytest.raises(UserError, match="no SwiGLU FFN"):
        add_masks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), MaskConfig())
    with pytest.raises(UserError, match="biases"):
        add_masks(tiny_decoder(mlp_bias=True), MaskConfig())
    model = tiny_decoder()
    add_masks(model, MaskConfig())
    with pytest.raises(UserError, match="already has mask experts"):
        add_masks(model, MaskConfig())


@pytest.mark.parametrize(("field", "value"), [("experts", 0), ("top_k", 5), ("routing", "hash"), ("init_noise", -1)])
def test_bad_mask_config(field, value):
    with pytest.raises(UserError, match=field):
        MaskConfig(**{"experts": 4, field: value})
