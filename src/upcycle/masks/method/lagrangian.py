"""The Lagrangian that steers mask sparsity to a target (CoFi-style), with its multipliers and target ramp.

    L = L_task + λ1·(ŝ − t) + λ2·(ŝ − t)²

ŝ is the expected active ratio (see `upcycle.masks.method.active`), t the target active ratio, ramped linearly from 1
(every mask open) to its final value over a warm-up so the model sparsifies progressively. The model's parameters
descend L; the multipliers ascend it: ∂L/∂λ1 = ŝ − t and ∂L/∂λ2 = (ŝ − t)², so λ1 grows while the model is too
dense (and shrinks when too sparse) and λ2, a growing quadratic penalty, damps the oscillation around t.

Why λ2 starts large. Gradient ascent on λ1 alone is an integral controller on a plant that integrates too (each
gate's log α moves at a roughly constant, Adam-normalised speed), which oscillates; and the swings are lopsided,
because a firmly closed gate no longer feels the task loss (its samples are all exactly 0), so once the ratio
undershoots only a negative price can reopen gates, and it reopens them indiscriminately. The quadratic term's
gradient 2·λ2·(ŝ − t) is a proportional restoring force; starting λ2 at `initial_lambda2` damps the loop from the
first step. On the toy problem in the tests, λ2 = 0 undershoots a 0.5 target to ≈ 0.26; λ2 = 100 ends within
0.3 points of every target tried.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from upcycle.masks.config import LagrangianConfig


class Lagrangian:
    """Penalty and multipliers. Call `penalty` inside the loss, then `ascend` once per optimizer step."""

    def __init__(self, config: LagrangianConfig) -> None:
        self.config = config
        self.lambda1 = 0.0
        self.lambda2 = config.initial_lambda2
        self.step = 0

    def target_at(self, step: int) -> float:
        """The ramped target after `step` optimizer steps."""
        if step >= self.config.warmup_steps:
            return self.config.target
        return 1.0 - (1.0 - self.config.target) * step / self.config.warmup_steps

    def penalty(self, ratio: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """λ1·(ŝ − t) + λ2·(ŝ − t)² for the current step's target, and the numbers worth logging."""
        target = self.target_at(self.step)
        gap = ratio - target
        penalty = self.lambda1 * gap + self.lambda2 * gap * gap
        return penalty, {"expected_active": float(ratio.detach()), "target": target, "penalty": float(penalty.detach()),
                         "lambda1": self.lambda1, "lambda2": self.lambda2}

    def ascend(self, ratio: float) -> None:
        """Gradient ascent on λ1, λ2 at the ratio the step just measured; advances the step counter."""
        gap = ratio - self.target_at(self.step)
        self.lambda1 += self.config.lr * gap
        self.lambda2 += self.config.lr * gap * gap
        self.step += 1

    def state_dict(self) -> dict:
        """Multipliers and step, for resuming."""
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "step": self.step, "config": asdict(self.config)}

    def load_state_dict(self, state: dict) -> None:
        self.lambda1, self.lambda2, self.step = float(state["lambda1"]), float(state["lambda2"]), int(state["step"])
