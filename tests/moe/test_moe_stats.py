"""Routing statistics and the trainer-owned collector."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_helpers import make_layer, padding_mask

from upcycle.moe.collector import collect_routing
from upcycle.moe.losses import combine_aux_losses


@pytest.mark.parametrize("router", ["switch", "gshard", "st_moe"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(1, 30), experts=st.integers(2, 6), pad=st.integers(0, 5),
       policy=st.sampled_from(["all", "random"]), capacity_factor=st.sampled_from([0.25, 1.0, 2.0]),
       seed=st.integers(0, 999))
def test_sent_plus_dropped_is_k_times_tokens(router, dispatch, tokens, experts, pad, policy, capacity_factor, seed):
    pad = min(pad, tokens - 1)
    policy = "all" if router == "switch" else policy
    layer = make_layer(router, dispatch, experts=experts, seed=seed, second_expert_policy=policy,
                       capacity_factor=capacity_factor).train()
    stats = layer.forward_with_aux(torch.randn(tokens, 8, dtype=torch.float64), padding_mask(tokens, pad)).stats
    k = layer.router.top_k
    assert int(stats.tokens) == tokens - pad
    assert int(stats.sent.sum() + stats.dropped + stats.skipped) == k * (tokens - pad)
    assert int(stats.routed.sum()) == k * (tokens - pad)
    if dispatch == "capacity":
        assert int(stats.sent.max()) <= stats.capacity
        torch.testing.assert_close(stats.utilisation, stats.sent.double() / stats.capacity, check_dtype=False)
    else:
        assert int(stats.dropped) == 0
        assert float(stats.utilisation.mean()) == pytest.approx(1.0)
    if policy == "all":
        assert int(stats.skipped) == 0


def test_capacity_drops_are_counted_and_utilisation_is_per_capacity():
    layer = make_layer("switch", "capacity", experts=2, capacity_factor=0.5).train()
    x = torch.randn(20, 8, dtype=torch.float64)
    stats = layer.forward_with_aux(x).stats
    assert stats.capacity == math.ceil(0.5 * 1 * 20 / 2)
    assert int(stats.dropped) == 20 - int(stats.sent.sum()) >= 10
    assert float(stats.dropped_fraction) == pytest.approx(int(stats.dropped) / 20)
    assert int(stats.unrouted) == int(stats.dropped)  # top-1: a dropped token reached no expert


def test_entropy_is_the_mean_router_entropy_over_real_tokens():
    layer = make_layer("gshard", "dropless", experts=4)
    x, mask = torch.randn(10, 8, dtype=torch.float64), padding_mask(10, 3)
    output = layer.forward_with_aux(x, mask)
    p = output.routing.probs.detach()[:7]
    assert float(output.stats.entropy) == pytest.approx(float(-(p * p.log()).sum(-1).mean()))


def test_expert_choice_fills_every_expert_exactly():
    layer = make_layer("expert_choice", "capacity", experts=4, capacity_factor=1.0).train()
    stats = layer.forward_with_aux(torch.randn(12, 8, dtype=torch.float64)).stats
    assert stats.sent.tolist() == [3, 3, 3, 3] and stats.capacity == 3
    assert float(stats.utilisation.min()) == 1.0 and int(stats.dropped) == 0
    assert 0 <= int(stats.unrouted) <= 12
    assert set(stats.to_dict()) >= {"tokens", "dropped_fraction", "entropy", "tokens_per_expert", "utilisation"}


def test_collector_brings_the_mask_in_and_one_record_per_layer_out():
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_layer("st_moe", "capacity"), make_layer("st_moe", "capacity", seed=1))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with collect_routing(model, padding_mask=mask) as collector:
        model(x)
    assert [r.name for r in collector.records] == ["0", "1"]
    assert all(int(r.stats.tokens) == 7 for r in collector.records)
    direct = [layer.forward_with_aux(h, mask) for layer, h in [(model[0], x), (model[1], model[0](x))]]
    expected = combine_aux_losses([d.aux for d in direct], 0.01, 1e-3)
    torch.testing.assert_close(collector.aux_loss(0.01, 1e-3), expected)
    collector.aux_loss(0.01, 1e-3).backward()
    assert model[1].router.weight.grad.abs().sum() > 0
    assert model[0].collector is None and model[1].collector is None  # detached after the block
    metrics = collector.metrics(per_layer=True)
    assert {"moe/balance_loss", "moe/z_loss", "moe/dropped_fraction", "moe/0/entropy"} <= set(metrics)
