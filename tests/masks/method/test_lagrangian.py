"""The Lagrangian controller drives a toy bank of gates, trained through the shared loop, onto its target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.masks.config import LagrangianConfig
from upcycle.masks.method.hard_concrete import HardConcreteGate
from upcycle.masks.method.lagrangian import Lagrangian
from upcycle.training.config import TrainConfig
from upcycle.training.loop import train


class ToyGates(nn.Module):
    """2000 gates; the task rewards keeping each open in proportion to a random importance."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = HardConcreteGate((2000,))
        self.register_buffer("importance", torch.rand(2000, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_toy_problem_ends_within_one_point_of_target(target):
    torch.manual_seed(0)
    model = ToyGates()
    lagrangian = Lagrangian(LagrangianConfig(target=target, warmup_steps=300, lr=0.05))

    def loss_fn(model, inputs, labels):
        task = -(model.importance * model.gates()).mean()
        penalty, metrics = lagrangian.penalty(model.gates.expected_l0().mean())
        return task + penalty, metrics

    blocks = torch.zeros(4, 2, dtype=torch.long)
    config = TrainConfig(steps=800, batch_size=1, lr=0.05, warmup_steps=10, min_lr_ratio=1.0, grad_clip=0.0)
    result = train(model, (blocks, blocks), config, loss_fn=loss_fn,
                   after_step=lambda step, record: lagrangian.ascend(record["expected_active"]))

    assert result.history[0]["target"] == 1.0 and result.history[-1]["target"] == target
    assert lagrangian.step == 800
    expected = float(model.gates.expected_l0().detach().mean())
    achieved = float((model.gates.deterministic() > 0).float().mean())
    assert abs(expected - target) <= 0.01
    assert abs(achieved - target) <= 0.01
    # the kept gates are the important ones
    kept = model.gates.deterministic() > 0
    assert model.importance[kept].mean() > model.importance[~kept].mean() + 0.3


def test_target_ramp_and_state_round_trip():
    lagrangian = Lagrangian(LagrangianConfig(target=0.4, warmup_steps=10))
    assert [lagrangian.target_at(s) for s in (0, 5, 10, 50)] == pytest.approx([1.0, 0.7, 0.4, 0.4])
    penalty, metrics = lagrangian.penalty(torch.tensor(0.9))
    assert float(penalty) == pytest.approx(100.0 * 0.1**2) and metrics["target"] == 1.0
    lagrangian.ascend(0.9)
    assert lagrangian.lambda1 == pytest.approx(-0.05 * 0.1)
    copy = Lagrangian(LagrangianConfig(target=0.4, warmup_steps=10))
    copy.load_state_dict(lagrangian.state_dict())
    assert (copy.lambda1, copy.lambda2, copy.step) == (lagrangian.lambda1, lagrangian.lambda2, 1)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_target_outside_unit_interval_is_refused(target):
    with pytest.raises(UserError, match="--recipe.target"):
        LagrangianConfig(target=target)
