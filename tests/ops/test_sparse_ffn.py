"""The packed sparse FFN against the plain masked reference, over a grid of sizes, routings and dtypes."""

from __future__ import annotations

import itertools

import pytest
import torch

from upcycle.ops.reference_ffn import mixture_mask, reference_masked_ffn, union_mask
from upcycle.ops.sparse_ffn import SparseFFN

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def random_masks(intermediate: int, experts: int, shared_fraction: float, expert_fraction: float, overlap: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """shared [I] and experts [E, I] with fractional values; experts' supports overlap or partition the rest."""
    perm = torch.randperm(intermediate, generator=generator)
    n_shared = int(shared_fraction * intermediate)
    values = torch.where(torch.rand(intermediate, generator=generator) < 0.5, 1.0,
                         torch.rand(intermediate, generator=generator) * 0.9 + 0.05)
    shared = torch.zeros(intermediate)
    shared[perm[:n_shared]] = values[perm[:n_shared]]
    rest = perm[n_shared:]
    routed = torch.zeros(experts, intermediate)
    for e in range(experts):
        if overlap:
            pick = rest[torch.rand(rest.numel(), generator=generator) < expert_fraction]
        else:
            pick = rest[e::experts][: max(1, int(expert_fraction * rest.numel()))]
        routed[e, pick] = torch.rand(pick.numel(), generator=generator) * 0.9 + 0.1
    return shared, routed


def make_case(hidden, intermediate, experts, overlap, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_gate = torch.randn(intermediate, hidden, generator=g) / hidden**0.5
    w_up = torch.randn(intermediate, hidden, generator=g) / hidden**0.5
    w_down = torch.randn(hidden, intermediate, generator=g) / intermediate**0.5
    shared, routed = random_masks(intermediate, experts, 0.3, 0.3, overlap, g)
    return [t.to(dtype) for t in (w_gate, w_up, w_down, shared, routed)], g


GRID = [case for case in itertools.product(
    [(16, 48), (64, 200)],                 # (D, I)
    [1, 4],                                # E
    [1, 2],                                # K
    [1, 7],                                # T (decode, batched)
    [False, True],                         # overlapping experts
    [torch.float64, torch.float32, torch.bfloat16],
) if case[2] <= case[1]]  # K <= E


@pytest.mark.parametrize(("shape", "experts", "k", "tokens", "overlap", "dtype"), GRID)
def test_union_routing_matches_reference(shape, experts, k, tokens, overlap, dtype):
    hidden, intermediate = shape
    (w_gate, w_up, w_down, shared, routed), g = make_case(hidden, intermediate, experts, overlap, dtype)
    op = SparseFFN.from_dense(w_gate, w_up, w_down, shared, routed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    expert_idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    got = op(x, expert_idx)
    want = reference_masked_ffn(x, w_gate, w_up, w_down, union_mask(shared, routed, expert_idx))
    torch.testing.assert_close(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixture_routing_matches_reference(dtype):
    (w_gate, w_up, w_down, shared, routed), g = make_case(32, 96, 4, True, dtype)
    op = SparseFFN.from_dense(w_gate, w_up, w_down, shared, routed)
    x = torch.randn(5, 32, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(5, 4, generator=g), -1).to(dtype)
    want = reference_masked_ffn(x, w_gate, w_up, w_down, mixture_mask(shared, routed, weights))
    torch.testing.assert_close(op.forward_mixture(x, weights), want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_all_open_equals_dense_and_static_mask_skips_rows():
    (w_gate, w_up, w_down, _, _), g = make_case(16, 40, 1, False, torch.float64)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    dense = reference_masked_ffn(x, w_gate, w_up, w_down, torch.ones(3, 40, dtype=torch.float64))
    op = SparseFFN.from_dense(w_gate, w_up, w_down, torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(op(x), dense)
    half = torch.zeros(40, dtype=torch.float64)
    half[::2] = 1
    static = SparseFFN.from_dense(w_gate, w_up, w_down, half)
    assert static.w_gate_up.shape[0] == 20
    torch.testing.assert_close(static(x), reference_masked_ffn(x, w_gate, w_up, w_down, half.expand(3, -1)))


@pytest.mark.parametrize("tokens", [1, 6])
def test_overlapping_choices_take_the_gathered_path(tokens, monkeypatch):
    (w_gate, w_up, w_down, shared, routed), g = make_case(16, 48, 3, True, torch.float64)
    routed[:, 0:40] = 0
    routed[:, 40:44] = 0.7  # every expert keeps neurons 40..43: any two chosen experts overlap
    routed[0, 44], routed[1, 45], routed[2, 46] = 1.0, 0.3, 0.9
    shared[40:47] = 0
    op = SparseFFN.from_dense(w_gate, w_up, w_down, shared, routed)
    calls = []
    union = op._union
    monkeypatch.setattr(op, "_union", lambda x, chosen: calls.append(chosen) or union(x, chosen))
    x = torch.randn(tokens, 16, generator=g, dtype=torch.float64)
    expert_idx = torch.tensor([[0, 2], [1, 0], [2, 1]] * 2)[:tokens]
    want = reference_masked_ffn(x, w_gate, w_up, w_down, union_mask(shared, routed, expert_idx))
    torch.testing.assert_close(op(x, expert_idx), want)
    assert len(calls) == tokens


def test_active_neuron_counts_and_empty_experts():
    (w_gate, w_up, w_down, shared, routed), g = make_case(16, 48, 4, True, torch.float64)
    routed[2] = 0  # an expert that kept no neuron still routes (to nothing)
    op = SparseFFN.from_dense(w_gate, w_up, w_down, shared, routed)
    expert_idx = torch.tensor([[2, 0], [1, 3], [2, 2]])
    want = (union_mask(shared, routed, expert_idx) != 0).sum(1)
    assert torch.equal(op.active_neurons(expert_idx), want)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op(x, expert_idx), reference_masked_ffn(
        x, w_gate, w_up, w_down, union_mask(shared, routed, expert_idx)))


def test_state_dict_round_trip():
    (w_gate, w_up, w_down, shared, routed), g = make_case(16, 48, 3, True, torch.float32)
    op = SparseFFN.from_dense(w_gate, w_up, w_down, shared, routed)
    loaded = SparseFFN(16, 48, op.sizes)
    loaded.load_state_dict(op.state_dict())
    x, idx = torch.randn(4, 16, generator=g), torch.tensor([[0, 1], [2, 0], [1, 2], [0, 1]])
    torch.testing.assert_close(loaded(x, idx), op(x, idx))


def test_shared_and_routed_must_be_disjoint():
    (w_gate, w_up, w_down, shared, routed), _ = make_case(16, 48, 2, True, torch.float32)
    routed[0, torch.nonzero(shared)[0]] = 0.5
    with pytest.raises(ValueError, match="both shared and routed"):
        SparseFFN.from_dense(w_gate, w_up, w_down, shared, routed)
