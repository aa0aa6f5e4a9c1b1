"""Every router and dispatcher against the slow float64 loop references: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_helpers import leaf_copies, make_layer, padding_mask

from upcycle.moe.dispatch import expert_capacity
from upcycle.ops.reference_moe import reference_capacity_moe, reference_expert_choice_moe

SIZES = dict(tokens=st.integers(1, 12), experts=st.integers(1, 5), pad=st.integers(0, 3), seed=st.integers(0, 999))


def _compare(layer, x, mask, reference):
    """Run layer and reference on the same values; compare outputs and grads of x, router and expert weights."""
    grad_out = torch.randn_like(x)
    fast = [x.detach().clone().requires_grad_(True), layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    slow = leaf_copies(*fast)
    out = layer.forward_with_aux(fast[0], mask).hidden
    out.backward(grad_out)
    expected = reference(*slow)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    for name, got, want in zip(["x", "router", "w_in", "w_out"], fast, slow, strict=True):
        got_grad, want_grad = (torch.zeros_like(t) if t.grad is None else t.grad for t in (got, want))
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("router", ["switch", "gshard", "st_moe"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@settings(max_examples=10, deadline=None)
@given(**SIZES, capacity_factor=st.sampled_from([0.5, 1.0, 8.0]))
def test_token_choice_matches_reference(router, dispatch, tokens, experts, pad, seed, capacity_factor):
    pad = min(pad, tokens - 1)
    layer = make_layer(router, dispatch, experts=experts, seed=seed, top_k=min(2, experts) if router != "switch"
                       else None, capacity_factor=capacity_factor).train()
    k = layer.router.top_k
    torch.manual_seed(seed + 1)
    x = torch.randn(tokens, 8, dtype=torch.float64)
    mask = padding_mask(tokens, pad)
    valid = None if mask is None else mask.bool()
    capacity = expert_capacity(capacity_factor, k, tokens - pad, experts) if dispatch == "capacity" else None

    def reference(x, router_w, w_in, w_out):
        return reference_capacity_moe(x, router_w, w_in, w_out, k, layer.router.normalize_gates, capacity, valid)[0]

    _compare(layer, x, mask, reference)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@settings(max_examples=10, deadline=None)
@given(**SIZES, capacity_factor=st.sampled_from([0.5, 1.0, 2.0]))
def test_expert_choice_matches_reference(dispatch, tokens, experts, pad, seed, capacity_factor):
    pad, experts = min(pad, tokens - 1), max(experts, 2)  # one expert: p = 1 for all tokens, ties pick at random
    layer = make_layer("expert_choice", dispatch, experts=experts, seed=seed, capacity_factor=capacity_factor).train()
    torch.manual_seed(seed + 1)
    x = torch.randn(tokens, 8, dtype=torch.float64)
    mask = padding_mask(tokens, pad)
    valid = None if mask is None else mask.bool()

    def reference(x, router_w, w_in, w_out):
        return reference_expert_choice_moe(x, router_w, w_in, w_out, capacity_factor, valid)

    _compare(layer, x, mask, reference)


def test_padding_tokens_get_zero_output_and_take_no_capacity():
    layer = make_layer("gshard", "capacity", experts=2, capacity_factor=1.0).train()
    x = torch.randn(6, 8, dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    output = layer.forward_with_aux(x, mask)
    assert torch.equal(output.hidden[4:], torch.zeros(2, 8, dtype=torch.float64))
    assert output.stats.capacity == expert_capacity(1.0, 2, 4, 2)  # counted on the 4 real tokens
    assert output.stats.tokens == 4


def test_gshard_random_policy_sends_second_choice_with_probability_twice_its_gate():
    layer = make_layer("gshard", "dropless", experts=4, second_expert_policy="random")
    with torch.no_grad():
        layer.router.weight.mul_(0.3)  # a softer router: second gates spread over (0, 0.5]
    tokens = 4000
    x = torch.randn(tokens, 8, dtype=torch.float64)
    routing = layer.train().forward_with_aux(x).routing
    top2 = routing.probs.detach().topk(2, dim=-1).values  # [T, 2]
    expected_rate = float((2 * top2[:, 1] / top2.sum(-1)).clamp(max=1).mean())
    sent_rate = (routing.token.numel() - tokens) / tokens
    assert abs(sent_rate - expected_rate) < 0.03
    first_gates = routing.gate[:tokens].detach()
    torch.testing.assert_close(first_gates, top2[:, 0] / top2.sum(-1))  # the first gate is not renormalised
    assert layer.eval().forward_with_aux(x).routing.token.numel() == 2 * tokens  # evaluation sends every choice


def test_jitter_changes_routing_only_in_training():
    layer = make_layer("switch", "dropless", experts=4, jitter_noise=0.5)
    x = torch.randn(64, 8, dtype=torch.float64)
    eval_a, eval_b = (layer.eval().forward_with_aux(x).routing.logits for _ in range(2))
    assert torch.equal(eval_a, eval_b)
    assert not torch.equal(layer.train().forward_with_aux(x).routing.logits, eval_a)


def test_router_logits_are_float32_for_bfloat16_models():
    layer = make_layer("gshard", "dropless", dtype=torch.bfloat16)
    output = layer.forward_with_aux(torch.randn(5, 8, dtype=torch.bfloat16))
    assert output.routing.logits.dtype == torch.float32 and output.hidden.dtype == torch.bfloat16


@pytest.mark.parametrize("router", ["switch", "gshard", "expert_choice"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_an_all_padding_batch_routes_nothing(router, dispatch):
    layer = make_layer(router, dispatch).train()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    output = layer.forward_with_aux(x, torch.zeros(2, 3))
    assert torch.equal(output.hidden, torch.zeros_like(x)) and int(output.stats.tokens) == 0
    (output.hidden.sum() + output.aux.balance + output.aux.z).backward()


def test_switch_renormalised_gate_is_one_with_the_gradient_of_p():
    # Same weights, two gates: straight-through (value 1) and Switch's raw gate = p.
    straight = make_layer("switch", "dropless", experts=4, normalize_gates=True).train()
    raw = make_layer("switch", "dropless", experts=4, normalize_gates=False).train()
    x = torch.randn(10, 8, dtype=torch.float64)
    p = torch.softmax(x @ raw.router.weight.detach().T, dim=-1).max(dim=-1).values  # [T] the chosen expert's p
    out_straight, out_raw = straight(x), raw(x)
    # value: the expert's output unscaled, i.e. the raw layer's output divided by p
    torch.testing.assert_close(out_straight, out_raw / p[:, None], rtol=1e-12, atol=1e-12)
    # router gradient, under a loss linear in the output: both gates see dL/dp = g . e (e: the expert's output)
    g = torch.randn_like(out_raw)
    (out_straight * g).sum().backward()
    (out_raw * g).sum().backward()
    torch.testing.assert_close(straight.router.weight.grad, raw.router.weight.grad, rtol=1e-10, atol=1e-12)
    assert straight.router.weight.grad.abs().sum() > 0
