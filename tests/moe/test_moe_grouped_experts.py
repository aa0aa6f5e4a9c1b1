"""The grouped SwiGLU backends, and the dispatch paths that feed them, against the loop references: values and
gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_helpers import leaf_copies, make_layer, padding_mask

from upcycle.ops.grouped_experts import grouped_swiglu, resolve_backend
from upcycle.ops.reference_moe import reference_capacity_moe, reference_grouped_swiglu

GRID = dict(counts=st.lists(st.integers(0, 5), min_size=1, max_size=5).filter(lambda c: sum(c) > 0),
            dim=st.sampled_from([1, 3, 8]), ffn=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))


@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "padded_bmm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=12, deadline=None)
@given(**GRID)
def test_backend_matches_reference(backend, dtype, counts, dim, ffn, seed):
    generator = torch.Generator().manual_seed(seed)
    experts, rows = len(counts), sum(counts)
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    w_in = torch.randn(experts, dim, 2 * ffn, generator=generator, dtype=torch.float64)
    w_out = torch.randn(experts, ffn, dim, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    counts_t = torch.tensor(counts)

    fast = leaf_copies(x.to(dtype), w_in.to(dtype), w_out.to(dtype))
    out = grouped_swiglu(*fast, counts_t, backend=backend)
    out.backward(grad_out.to(dtype))
    slow = leaf_copies(x, w_in, w_out)
    expected = reference_grouped_swiglu(*slow, counts_t)
    expected.backward(grad_out)

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), expected, **tol)
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


def test_grouped_mm_accepts_a_stride_zero_gradient():
    """torch._grouped_mm's CPU backward rejects expanded gradients (from .sum()); our wrapper makes them dense."""
    x, w_in, w_out = leaf_copies(torch.randn(5, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 4))
    grouped_swiglu(x, w_in, w_out, torch.tensor([2, 3]), backend="grouped_mm").sum().backward()
    assert x.grad is not None and torch.isfinite(w_in.grad).all()


def test_grouped_mm_is_used_where_it_can_be_and_falls_back_where_not():
    x, w_in, w_out = torch.zeros(5, 8), torch.zeros(2, 8, 8), torch.zeros(2, 4, 8)
    assert resolve_backend("grouped_mm", x, w_in, w_out) == "grouped_mm"
    assert resolve_backend("grouped_mm", x.double(), w_in.double(), w_out.double()) == "loop"
    assert resolve_backend("grouped_mm", torch.zeros(5, 3), torch.zeros(2, 3, 8), torch.zeros(2, 4, 3)) == "loop"
    assert resolve_backend("auto", x, w_in, w_out) == "padded_bmm"
    assert resolve_backend("auto", x, w_in, w_out, counts=torch.tensor([3, 2])) == "padded_bmm"
    assert resolve_backend("auto", x, w_in, w_out, counts=torch.tensor([5, 0])) == "grouped_mm"  # 100 % padding


@pytest.mark.parametrize("activation", [torch.nn.functional.silu, torch.nn.functional.gelu])
def test_gated_activation_gradient_matches_autograd(activation):
    from upcycle.ops.grouped_experts import gated

    hidden = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda h: gated(h, activation), (hidden,))
    gate, up = hidden.detach().chunk(2, dim=-1)
    torch.testing.assert_close(gated(hidden, activation), activation(gate) * up)


@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "loop", "padded_bmm"])
@pytest.mark.parametrize(("dispatch", "capacity_factor"), [("dropless", None), ("capacity", 8.0), ("capacity", 0.5)])
@pytest.mark.parametrize("pad", [0, 2])
def test_layer_on_every_backend_matches_reference(backend, dispatch, capacity_factor, pad):
    """pad 0 and nothing dropped: a complete routing, whose rows move by gathers only; pad 2 or drops: scatter-add."""
    tokens, experts = 24, 4
    layer = make_layer("gshard", dispatch, experts=experts, dim=16, ffn=8, dtype=torch.float32, seed=pad,
                       grouped_backend=backend, capacity_factor=capacity_factor or 1.0).train()
    torch.manual_seed(1)
    x = torch.randn(tokens, 16, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    mask = padding_mask(tokens, pad)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * 2 * (tokens - pad) / experts)

    fast = [x.float().requires_grad_(True), layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    output = layer.forward_with_aux(fast[0], mask)
    output.hidden.backward(grad_out.float())
    slow = leaf_copies(*(t.double() for t in fast))
    expected, load = reference_capacity_moe(*slow, 2, True, capacity, None if mask is None else mask.bool())
    expected.backward(grad_out)

    assert output.routing.complete == (pad == 0)
    if capacity_factor == 0.5:
        assert sum(load) < 2 * (tokens - pad)  # some assignments were dropped
    torch.testing.assert_close(output.hidden.double(), expected, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(["x", "router", "w_in", "w_out"], fast, slow, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


def test_complete_routing_lists_every_choice_choice_major():
    layer = make_layer("gshard", "dropless", experts=4, second_expert_policy="random").train()
    x = torch.randn(6, 8, dtype=torch.float64)
    layer.eval()  # the random second-expert policy only applies in training
    for valid in (None, torch.ones(6, dtype=torch.bool)):
        routing = layer.router(x, valid)
        assert routing.complete
        torch.testing.assert_close(routing.token, torch.arange(6).repeat(2))
        torch.testing.assert_close(routing.expert, routing.choices.T.reshape(-1))
    assert not layer.router(x, torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)).complete
    layer.train()
    assert not layer.router(x).complete


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_an_empty_batch_passes_through(dispatch):
    layer = make_layer("gshard", dispatch).train()
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    output = layer.forward_with_aux(x)
    output.hidden.sum().backward()
    assert output.hidden.shape == (0, 8) and x.grad.shape == (0, 8)
