"""Calibrate the test-time gates so that the achieved active ratio equals the target.

The Lagrangian steers the *expected* L0 of the sampled gates during training, but the model is evaluated and
compacted with the deterministic gate. The two do not count the same neurons: a gate just above the deterministic
cut-off (log α ≈ −2.4) counts fully at test time but only ~0.3 in expectation, and one just below counts 0 and ~0.3.
The controller also ends a little off target. In the tiny-base sweep the achieved ratios came out at 23.98 %,
50.57 % and 76.47 % for targets of 25, 50 and 75 %.

After training, `calibrate_gates` chooses one offset δ by bisection so that the width-weighted active ratio on the
calibration blocks (`analyze_masks`) is as close to the target as the discrete gates allow. A single offset keeps the
learned ranking of neurons within every expert and the learned split between layers. This is the role of TEAL's
calibrated thresholds, or of CoFi's exact count of gates to keep.

The offset opens by shifting and closes by cutting:
- δ ≥ 0 (too few neurons active): δ is added to every gate's log α;
- δ < 0 (too many): every gate with log α + δ at or below `closed_log_alpha()` closes, and every other gate keeps
  its learned value. The same gates close as under a shift by δ, but the kept ones are not scaled down.
The shift closed the same gates but also turned the kept ones into fractions: harmless when training has separated
the gates into open and closed, ruinous when it has not. SmolLM2-135M after 48 steps (docs/masks.md, issue 13) had
closed no gate (59.7 % expected active for a 50 % target); the shift that closed the last 10 points left
every kept gate of every layer scaling its neuron down to a fraction, and validation perplexity went from 48.3 to
2.6 million (the first layer's masks alone: 2,356). The cut gives 51.1 on the same masks.

`masks train` calibrates on the validation split, where settings are chosen, and the test split checks that the
calibration transfers. Training tokens do not stand in for held-out ones: the masks are more active on the documents
they were trained on (26.2 / 52.0 / 76.9 % against 24.0 / 50.6 / 76.5 % on validation, docs/masks.md), and
calibrating on them left held-out tokens at 23.1 / 48.6 / 74.9 %. Calibrated on validation, the test split landed
at 25.02 / 49.91 / 75.17 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from upcycle.masks.method.analysis import MaskAnalysis, analyze_masks
from upcycle.masks.method.hard_concrete import closed_log_alpha
from upcycle.masks.method.surgery import masked_ffns

_BISECTION_STEPS = 30
_SEARCH_RANGE = 12.0
"""δ is searched in [−range, +range]: wider than the log α spread between open (> 2.4) and closed (< −2.4) gates."""


@dataclass
class GateCalibration:
    """The offset `calibrate_gates` chose and what it did."""

    delta: float
    """The offset: added to every gate's log α when ≥ 0; when < 0, the gates it would shift shut close and the
    others are left alone (see the module docstring)."""
    before: float
    """Active ratio on the calibration blocks without the shift."""
    after: float
    """Active ratio with it."""
    analysis: MaskAnalysis
    """The expert analysis of the calibration blocks with the shift (what `analyze_masks` would now return)."""

    def summary(self) -> dict[str, float]:
        return {"delta": self.delta, "before": self.before, "after": self.after}


@torch.no_grad()
def calibrate_gates(model: nn.Module, inputs: torch.Tensor, target: float,
                    labels: torch.Tensor | None = None) -> GateCalibration:
    """Offset the gates by one δ (opening by a shift, closing by a cut: module docstring) so that the active ratio on
    blocks `inputs` [N, L] is closest to `target`.

    `labels` [N, L] as for `analyze_masks` (padding positions are not counted). The model keeps the chosen offset.
    """
    layers = [layer for _, layer in masked_ffns(model)]
    learned = [layer.gates.log_alpha.detach().clone() for layer in layers]
    closed = closed_log_alpha()

    def shifted(delta: float) -> None:  # from the learned values each time: no drift from repeated +δ/−δ
        for layer, log_alpha in zip(layers, learned, strict=True):
            moved = log_alpha + delta
            layer.gates.log_alpha.copy_(moved if delta >= 0 else torch.where(moved <= closed, moved, log_alpha))

    def analyse(delta: float) -> MaskAnalysis:
        shifted(delta)
        return analyze_masks(model, inputs, labels)

    start = analyse(0.0)
    best_error, best_delta, best = abs(start.active_ratio - target), 0.0, start
    low, high = -_SEARCH_RANGE, _SEARCH_RANGE  # the active ratio does not decrease with δ
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        analysis = analyse(mid)
        error = abs(analysis.active_ratio - target)
        if (error, mid) < (best_error, best_delta):
            best_error, best_delta, best = error, mid, analysis
        if analysis.active_ratio < target:
            low = mid
        else:
            high = mid
    shifted(best_delta)
    return GateCalibration(best_delta, start.active_ratio, best.active_ratio, best)
