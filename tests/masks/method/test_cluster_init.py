"""The 'clusters' init: routers equal the nearest-centroid rule, gates start open and ranked by per-cluster use."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import tiny_decoder
from upcycle.errors import UserError
from upcycle.masks.config import MaskConfig, MaskTrainConfig
from upcycle.masks.method.cluster_init import apply_cluster_starts, cluster_starts
from upcycle.masks.method.ffn_inputs import collect_ffn_inputs, intermediate
from upcycle.masks.method.hard_concrete import open_log_alpha
from upcycle.masks.method.surgery import add_masks, masked_ffns
from upcycle.masks.method.train import prepare_masked_model
from upcycle.models.surgery import find_ffns

TOKENS = torch.randint(0, 97, (16, 16), generator=torch.Generator().manual_seed(0))
FRESH = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))


def test_router_is_the_nearest_centroid_rule_and_gates_start_open_in_importance_order():
    model = tiny_decoder()
    starts = cluster_starts(model, TOKENS, experts=6)
    fresh_inputs = collect_ffn_inputs(model, FRESH)  # tokens the k-means never saw
    mlps = dict(find_ffns(model))
    dense_logits = model(input_ids=FRESH).logits
    add_masks(model, MaskConfig(experts=6))
    apply_cluster_starts(model, starts, rank_spread=2.0)
    for name, layer in masked_ffns(model):
        x = fresh_inputs[name]
        nearest = torch.cdist(x, starts[name].centroids).argmin(dim=1)
        assert torch.equal(layer.router.choose(x)[:, 0], nearest)
        log_alpha = layer.gates.log_alpha.detach()
        assert float(log_alpha.min()) > open_log_alpha() and float(log_alpha.max()) <= open_log_alpha() + 2.2
        for e in range(6):  # the neuron a cluster uses more starts further from closing
            order = starts[name].importance[e].argsort()
            assert torch.all(log_alpha[e][order].diff() > 0)
    # every gate open: step 0 is the dense model (eval mode: the deterministic gates)
    model.eval()
    torch.testing.assert_close(model(input_ids=FRESH).logits, dense_logits, atol=1e-6, rtol=1e-6)
    # importance is each cluster's mean |activation|, checked token by token against the centroids' assignment
    name = next(iter(starts))
    x = collect_ffn_inputs(tiny_decoder(), TOKENS)[name]
    labels = torch.cdist(x, starts[name].centroids).argmin(dim=1)
    h = intermediate(mlps[name], x).abs().detach()
    for e in labels.unique().tolist():
        torch.testing.assert_close(starts[name].importance[e], h[labels == e].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_prepare_trains_only_gates_unless_routers_are_asked_for():
    config = MaskTrainConfig(masks=MaskConfig(experts=4))
    model = tiny_decoder()
    params = prepare_masked_model(model, config, TOKENS)
    assert {id(p) for p in params} == {id(layer.gates.log_alpha) for _, layer in masked_ffns(model)}
    config = MaskTrainConfig(masks=MaskConfig(experts=4), train_routers=True)
    model = tiny_decoder()
    params = prepare_masked_model(model, config, TOKENS)
    routers = {id(p) for _, layer in masked_ffns(model) for p in layer.router.parameters()}
    assert routers and routers <= {id(p) for p in params}


def test_bad_init_settings():
    with pytest.raises(UserError, match="--recipe.masks.init must be one of"):
        MaskConfig(init="kmeans")
    with pytest.raises(UserError, match="router_bias"):
        MaskConfig(router_bias=False)
    with pytest.raises(UserError, match="train_routers"):
        MaskTrainConfig(masks=MaskConfig(init="open"))
    with pytest.raises(UserError, match="at least --recipe.masks.experts"):
        cluster_starts(tiny_decoder(), TOKENS[:1, :4], experts=6)
