"""Auxiliary losses against loop references (values and gradients), and how transformers' version differs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_helpers import leaf_copies, padding_mask
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from upcycle.moe.losses import AuxLosses, combine_aux_losses, load_balancing_loss, router_z_loss
from upcycle.ops.reference_moe import reference_load_balancing_loss, reference_z_loss


def _ours(logits: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    probs = logits.softmax(-1)
    return load_balancing_loss(probs, probs.topk(k, dim=-1).indices, valid)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 10), experts=st.integers(1, 6), k=st.integers(1, 3), pad=st.integers(0, 3),
       seed=st.integers(0, 999))
def test_losses_match_reference_values_and_gradients(tokens, experts, k, pad, seed):
    k, pad = min(k, experts), min(pad, tokens - 1)
    logits = torch.randn(tokens, experts, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    mask = padding_mask(tokens, pad)
    valid = None if mask is None else mask.bool()
    for fast_fn, slow_fn in [(lambda x: _ours(x, k, valid), lambda x: reference_load_balancing_loss(x, k, valid)),
                             (lambda x: router_z_loss(x, valid), lambda x: reference_z_loss(x, valid))]:
        fast, slow = leaf_copies(logits, logits)
        got, want = fast_fn(fast), slow_fn(slow)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-10, atol=1e-12)


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    experts = 4
    balanced = torch.zeros(8, experts).index_put_((torch.arange(8), torch.arange(8) % experts), torch.tensor(50.0))
    collapsed = torch.zeros(8, experts)
    collapsed[:, 0] = 50.0
    assert float(_ours(balanced, 1)) == pytest.approx(1.0, abs=1e-6)
    assert float(_ours(collapsed, 1)) == pytest.approx(experts, abs=1e-6)


def test_layers_are_averaged_after_the_product():
    layers = [AuxLosses(balance=torch.tensor(1.0), z=torch.tensor(4.0)),
              AuxLosses(balance=torch.tensor(3.0), z=torch.tensor(0.0))]
    assert float(combine_aux_losses(layers, balance_coef=0.1, z_coef=0.01)) == pytest.approx(0.1 * 2 + 0.01 * 2)
    assert float(combine_aux_losses([], 0.1, 0.01)) == 0.0


# --- transformers 5.24's load_balancing_loss_func (models/mixtral/modeling_mixtral.py) ----------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_hf_counts_every_top_k_choice_without_dividing_by_k(k):
    """Its f sums to k over experts, so the balanced value is k, not 1: HF = k * ours for one layer."""
    logits = torch.randn(32, 6, dtype=torch.float64)
    hf = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
    torch.testing.assert_close(hf.double(), k * _ours(logits, k), rtol=1e-6, atol=1e-6)


def test_hf_padding_mask_agrees_with_ours():
    """Fixed in 5.x: padding is excluded from f and P exactly as we do (up to the k factor above)."""
    logits = torch.randn(2 * 7, 5, dtype=torch.float64)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[0, 5:] = 0
    attention_mask[1, :2] = 0  # left padding too
    hf = load_balancing_loss_func((logits,), num_experts=5, top_k=2, attention_mask=attention_mask)
    ours = _ours(logits, 2, attention_mask.reshape(-1).bool())
    torch.testing.assert_close(hf.double(), 2 * ours, rtol=1e-6, atol=1e-6)
    unmasked = load_balancing_loss_func((logits,), num_experts=5, top_k=2)
    assert not torch.allclose(hf, unmasked)  # the mask matters, and is used


def test_hf_pools_layers_before_the_product_so_opposite_collapses_look_balanced():
    """Several layers: HF sums f and P over layers first, E * sum_i mean_l(f_li) * mean_l(P_li). Two layers that each
    send every token to a different single expert are maximally unbalanced (Switch: E per layer), yet HF reports the
    perfectly balanced value k. We average the per-layer losses."""
    experts, tokens, k = 2, 16, 1
    layer_a = torch.tensor([[30.0, 0.0]]).expand(tokens, experts)  # everything to expert 0
    layer_b = torch.tensor([[0.0, 30.0]]).expand(tokens, experts)  # everything to expert 1
    hf = load_balancing_loss_func((layer_a, layer_b), num_experts=experts, top_k=k)
    assert float(hf) == pytest.approx(1.0 * k, abs=1e-6)  # "balanced"
    ours = combine_aux_losses([AuxLosses(_ours(layer, k), torch.zeros(())) for layer in (layer_a, layer_b)], 1.0, 0)
    assert float(ours) == pytest.approx(experts, abs=1e-6)  # collapsed, in both layers

    # On random logits the two also differ: pooling is not the mean of the per-layer products.
    logits = [torch.randn(tokens, 4, dtype=torch.float64) * 2 for _ in range(3)]
    pooled = load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2)
    per_layer = torch.stack([_ours(layer, 2) for layer in logits]).mean()
    assert not torch.allclose(pooled.double(), 2 * per_layer, atol=1e-4)


def test_hf_returns_zero_for_a_list_of_layers():
    """Anything but a tuple (a list of per-layer logits, one stacked tensor) silently gives 0: no balancing at all."""
    logits = torch.randn(8, 4)
    assert load_balancing_loss_func([logits, logits], num_experts=4, top_k=2) == 0
    assert load_balancing_loss_func(logits, num_experts=4, top_k=2) == 0
