"""Gate calibration: one offset of every gate (a shift up to open, a cut to close) brings the achieved active ratio
to the target on the given tokens."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import randomize_gates, tiny_decoder
from upcycle.masks.config import MaskConfig
from upcycle.masks.method.analysis import analyze_masks
from upcycle.masks.method.calibrate import calibrate_gates
from upcycle.masks.method.hard_concrete import closed_log_alpha, deterministic_gate
from upcycle.masks.method.surgery import add_masks, masked_ffns

TOKENS = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("target", [0.2, 0.5, 0.95])
def test_calibration_hits_the_target_with_one_offset_of_every_gate(target):
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
    assert (result.delta > 0) == (target > result.before)
    for name, layer in masked_ffns(model):  # the same δ everywhere: the learned ranking is untouched
        learned, now = before[name], layer.gates.log_alpha.detach()
        if result.delta >= 0:  # opening: every gate shifted up
            torch.testing.assert_close(now - learned, torch.full_like(learned, result.delta))
        else:  # closing: exactly the gates the shift would close, closed; the others as learned
            shut = learned + result.delta <= closed_log_alpha()
            assert torch.equal(now[shut], learned[shut] + result.delta) and torch.equal(now[~shut], learned[~shut])
            assert torch.all(deterministic_gate(now[shut]) == 0)


def test_closing_gates_training_has_not_separated_does_not_scale_the_kept_neurons_down():
    # every gate still open, ranked (as the clusters init leaves them and 48 steps on SmolLM2 left them)
    model = tiny_decoder()
    add_masks(model, MaskConfig(experts=4, init="open"))
    randomize_gates(model, seed=2, low=2.5, high=4.5)
    model.eval()
    assert analyze_masks(model, TOKENS).active_ratio == 1.0
    calibrate_gates(model, TOKENS, 0.5)
    for _, layer in masked_ffns(model):
        z = layer.eval_gates()
        assert torch.all((z == 0) | (z == 1))  # each neuron kept whole or dropped; a shift left them all fractions
        assert 0.3 < float((z == 1).float().mean()) < 0.7
