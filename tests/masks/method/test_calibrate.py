"""Gate calibration: one shift of every log α brings the achieved active ratio to the target on the given tokens."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import randomize_gates, tiny_decoder
from upcycle.masks.config import MaskConfig
from upcycle.masks.method.analysis import analyze_masks
from upcycle.masks.method.calibrate import calibrate_gates
from upcycle.masks.method.surgery import add_masks, masked_ffns

TOKENS = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_calibration_hits_the_target_with_one_shift_of_every_gate(target):
    model = tiny_decoder()
    add_masks(model, MaskConfig(experts=4, init="open"))
    randomize_gates(model, seed=1)  # log α spread over [-4, 4]: many gates half-open, as after training
    model.eval()
    before = {name: layer.gates.log_alpha.detach().clone() for name, layer in masked_ffns(model)}
    result = calibrate_gates(model, TOKENS, target)
    achieved = analyze_masks(model, TOKENS).active_ratio
    assert result.after == pytest.approx(achieved) == result.analysis.active_ratio
    # 64 neurons per layer: one neuron more or less in every expert moves the ratio by 1/64
    assert abs(achieved - target) <= 1 / 64
    assert abs(result.before - target) > abs(achieved - target)
    for name, layer in masked_ffns(model):  # the same δ everywhere: the learned ranking is untouched
        torch.testing.assert_close(layer.gates.log_alpha - before[name],
                                   torch.full_like(before[name], result.delta))
