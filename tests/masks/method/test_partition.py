"""The partitioned layout: each neuron shared, in one expert's block, or dropped; compaction stores it once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.masks.mask_helpers import tiny_decoder
from tests.masks.method.test_train import random_blocks, tiny_config
from upcycle.errors import UserError
from upcycle.masks.config import MaskConfig, MaskTrainConfig
from upcycle.masks.method.compact import compact_layers, compact_model, packed_rows
from upcycle.masks.method.partition import PartitionedGates, assign_neurons, shared_neurons
from upcycle.masks.method.surgery import masked_ffns
from upcycle.masks.method.train import train_masks

PARTITION = MaskConfig(experts=4, layout="partition")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), experts=st.integers(1, 9), width=st.integers(1, 60), data=st.data())
def test_every_neuron_is_shared_or_in_exactly_one_equal_block(seed, experts, width, data):
    shared = data.draw(st.integers(0, width))
    importance = torch.from_numpy(np.random.default_rng(seed).random((experts, width)))
    assignment = assign_neurons(importance, shared)
    everywhere = assignment.all(dim=0)
    assert int(everywhere.sum()) == (width if experts == 1 else shared)
    routed = assignment[:, ~everywhere].sum(dim=0)
    assert torch.all(routed == 1)  # one expert each, none dropped
    sizes = assignment[:, ~everywhere].sum(dim=1)
    assert int(sizes.max() - sizes.min()) <= 1
    # the shared neurons are the most important on average
    mean = importance.mean(dim=0)
    if 0 < shared < width and experts > 1:
        assert float(mean[everywhere].min()) >= float(mean[~everywhere].max())


def test_a_neuron_goes_to_the_cluster_that_uses_it_most_when_there_is_room():
    importance = torch.tensor([[9.0, 1.0, 1.0, 5.0], [1.0, 9.0, 1.0, 5.0], [1.0, 1.0, 9.0, 5.0]])  # [E=3, I=4]
    assignment = assign_neurons(importance[:, :3], shared=0)
    assert torch.equal(assignment, torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize(("experts", "k", "active"), [(8, 1, 0.5), (8, 2, 0.6), (16, 1, 0.25), (4, 1, 1.0)])
def test_shared_size_makes_a_token_use_the_asked_share(experts, k, active):
    width = 1536
    s = shared_neurons(width, experts, k, active)
    assert (s + k * (width - s) / experts) / width == pytest.approx(active, abs=1.0 / width)


def test_partition_training_compacts_to_disjoint_blocks_stored_once():
    model = tiny_decoder()
    train_masks(model, random_blocks(), tiny_config(steps=30, masks=PARTITION, target=0.5))
    for _, layer in masked_ffns(model):
        assert isinstance(layer.gates, PartitionedGates) and layer.gates.log_alpha.shape == (1, 64)
        support = layer.eval_gates() > 0  # [E, I]
        shared = support.all(dim=0)
        assert int(support[:, ~shared].sum(dim=0).max()) <= 1  # a routed neuron is in one expert at most
    tokens = random_blocks(4)[0]
    model.eval()
    want = model(input_ids=tokens).logits
    packed, dense = packed_rows(model)
    assert packed <= dense
    compact_model(model)
    for _, layer in compact_layers(model):
        overlap = layer.ffn.overlap
        assert torch.equal(overlap, torch.diag(overlap.diagonal()))  # disjoint blocks: no gathers needed
        assert layer.ffn.offsets[-1] <= 64
    torch.testing.assert_close(model(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("masks", "target", "message"), [
    ({"experts": 4, "layout": "partition", "routing": "soft"}, 0.5, "needs --recipe.masks.init clusters"),
    ({"experts": 2, "top_k": 2, "layout": "partition"}, 0.5, "top_k < experts"),
    ({"experts": 4, "layout": "partition"}, 0.2, "cannot reach it: use at least 5 experts"),
])
def test_settings_the_partition_cannot_work_with_are_refused(masks, target, message):
    with pytest.raises(UserError, match=message):
        MaskTrainConfig(target=target, masks=MaskConfig(**masks))


def test_ffn_fine_tuning_trains_the_masked_ffns_and_round_trips_through_the_mask_state():
    from upcycle.masks.method.surgery import add_masks, load_mask_state, mask_state_dict

    model = tiny_decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = tiny_config(steps=6, masks=PARTITION, target=0.5, ffn_lr=1e-3)
    train_masks(model, random_blocks(), config)
    after = model.state_dict()
    ffn = [k for k in before if any(f".mlp.{p}." in k for p in ("gate_proj", "up_proj", "down_proj"))]
    assert ffn and all(not torch.equal(before[k], after[k]) for k in ffn)
    untouched = [k for k in before if k not in ffn and k in after]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    state = mask_state_dict(model, ffn=True)
    assert set(ffn) <= set(state) and not set(ffn) & set(mask_state_dict(model))
    again = tiny_decoder()
    add_masks(again, PARTITION)
    load_mask_state(again, state, ffn=True)
    tokens = random_blocks(2)[0]
    torch.testing.assert_close(again.eval()(input_ids=tokens).logits, model.eval()(input_ids=tokens).logits)
