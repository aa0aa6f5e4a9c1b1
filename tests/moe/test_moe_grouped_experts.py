"""The grouped SwiGLU backends against the per-row loop reference: values and gradients, over a grid of sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_helpers import leaf_copies

from upcycle.ops.grouped_experts import grouped_swiglu, resolve_backend
from upcycle.ops.reference_moe import reference_grouped_swiglu

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
