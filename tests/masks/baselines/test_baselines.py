"""Baselines: balanced k-means, MoEfication, structured pruning and TEAL thresholds on tiny models."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import tiny_decoder
from upcycle.errors import UserError
from upcycle.masks.baselines.moefication import MoEficationConfig, cluster_neurons, moefy
from upcycle.masks.baselines.pruning import finetune_pruned, neuron_importance, prune_ffns
from upcycle.masks.baselines.teal import ThresholdFFN, sparsify_activations
from upcycle.masks.method.compact import compact_layers
from upcycle.training.config import TrainConfig

TOKENS = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))


def test_neuron_clusters_have_equal_sizes_and_follow_the_gate_rows():
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(4)
    rows = torch.cat([d + 0.05 * torch.randn(25, 4, generator=g) for d in directions])  # 4 blobs of 25 gate rows
    wide = tiny_decoder(hidden_size=4, intermediate_size=100, num_attention_heads=1, num_key_value_heads=1)
    mlp = wide.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(rows)
    assignment = cluster_neurons(mlp, 4, iterations=10, seed=1)
    assert torch.bincount(assignment).tolist() == [25, 25, 25, 25]
    for blob in range(4):
        assert assignment[blob * 25:(blob + 1) * 25].unique().numel() == 1
    uneven = cluster_neurons(tiny_decoder().model.layers[0].mlp, 6, iterations=3, seed=0)  # I = 64
    assert sorted(torch.bincount(uneven).tolist()) == [10, 10, 11, 11, 11, 11]
    with pytest.raises(ValueError, match="clusters"):
        cluster_neurons(mlp, 101, iterations=1, seed=0)


def test_moefication_one_expert_equals_dense_and_k_of_e_skips():
    model = tiny_decoder()
    want = model(input_ids=TOKENS).logits
    quick = TrainConfig(steps=20, batch_size=64, lr=1e-2, warmup_steps=2, grad_clip=0.0)
    moefy(model, TOKENS, MoEficationConfig(experts=1, top_k=1, router=quick))
    torch.testing.assert_close(model(input_ids=TOKENS).logits, want, rtol=1e-5, atol=1e-5)

    model = tiny_decoder()
    stats = moefy(model, TOKENS, MoEficationConfig(experts=4, top_k=2, router=quick))
    for layer_stats in stats.values():
        assert layer_stats["expert_sizes"] == [16, 16, 16, 16] and 0.5 <= layer_stats["router_recall"] <= 1.0
    for _, layer in compact_layers(model):
        chosen = layer.router.choose(torch.randn(5, 32))
        assert (layer.ffn.active_neurons(chosen) == 32).all()  # top-2 of 4 equal clusters: half the neurons
    assert torch.isfinite(model(input_ids=TOKENS).logits).all()


def test_pruning_keeps_the_most_important_neurons_and_fine_tunes():
    model = tiny_decoder()
    want = model(input_ids=TOKENS).logits
    assert prune_ffns(model, 1.0) == 64
    torch.testing.assert_close(model(input_ids=TOKENS).logits, want)

    model = tiny_decoder()
    mlp = model.model.layers[0].mlp
    top = set(neuron_importance(mlp).topk(32).indices.tolist())
    reference = mlp.gate_proj.weight[sorted(top)].clone()
    assert prune_ffns(model, 0.5) == 32 and model.config.intermediate_size == 32
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, reference)
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    embeddings = model.model.embed_tokens.weight.clone()
    finetune_pruned(model, (TOKENS, TOKENS.clone()), TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1))
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    with pytest.raises(UserError, match="keep"):
        prune_ffns(tiny_decoder(), 0.0)


def test_teal_thresholds_hit_the_target_sparsity():
    model = tiny_decoder()
    want = model(input_ids=TOKENS).logits
    sparsify_activations(model, TOKENS, keep=1.0)
    torch.testing.assert_close(model(input_ids=TOKENS).logits, want)

    model = tiny_decoder()
    sparsify_activations(model, TOKENS, keep=0.4)
    layer = model.model.layers[1].mlp
    assert isinstance(layer, ThresholdFFN)
    seen = {}
    hook = layer.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    model(input_ids=TOKENS)
    hook.remove()
    kept = (seen["x"].abs() > layer.tau_in).float().mean()
    assert abs(float(kept) - 0.4) < 0.02  # calibrated on these very tokens
