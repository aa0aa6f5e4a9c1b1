"""Hard-concrete gates against a float64, one-scalar-at-a-time reference written from the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from upcycle.masks.method.hard_concrete import (
    BETA,
    GAMMA,
    ZETA,
    HardConcreteGate,
    deterministic_gate,
    expected_l0,
    open_log_alpha,
    sample_gate,
)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _ref_sample(log_alpha: float, u: float) -> float:
    s = _sigmoid((math.log(u) - math.log(1 - u) + log_alpha) / BETA)
    return min(1.0, max(0.0, s * (ZETA - GAMMA) + GAMMA))


def _ref_deterministic(log_alpha: float) -> float:
    return min(1.0, max(0.0, _sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA))


LOG_ALPHAS = torch.tensor([-6.0, -2.5, -1.0, -0.1, 0.0, 0.7, 2.0, 2.4, 3.0, 8.0], dtype=torch.float64)


def test_sample_matches_reference():
    u = torch.linspace(0.01, 0.99, 25, dtype=torch.float64)
    la, uu = torch.meshgrid(LOG_ALPHAS, u, indexing="ij")
    got = sample_gate(la, uu)
    want = torch.tensor([[_ref_sample(float(a), float(b)) for b in u] for a in LOG_ALPHAS], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_deterministic_matches_reference():
    want = torch.tensor([_ref_deterministic(float(a)) for a in LOG_ALPHAS], dtype=torch.float64)
    torch.testing.assert_close(deterministic_gate(LOG_ALPHAS), want, rtol=1e-12, atol=1e-12)


def test_expected_l0_is_the_probability_of_a_nonzero_sample():
    # z > 0 exactly when u exceeds the u* at which the stretched sample crosses 0; P(z > 0) = 1 − u*.
    for log_alpha in LOG_ALPHAS.tolist():
        u_star = _sigmoid(BETA * math.log(-GAMMA / ZETA) - log_alpha)
        assert float(expected_l0(torch.tensor(log_alpha, dtype=torch.float64))) == pytest.approx(1 - u_star, abs=1e-12)
        if 1e-9 < u_star < 1 - 1e-9:
            assert _ref_sample(log_alpha, u_star * (1 - 1e-9)) == 0.0
            assert _ref_sample(log_alpha, u_star + (1 - u_star) * 1e-9) > 0.0


def test_sampled_gate_statistics():
    torch.manual_seed(0)
    n = 40_000
    gate = HardConcreteGate((LOG_ALPHAS.numel(), n)).double()
    with torch.no_grad():
        gate.log_alpha.copy_(LOG_ALPHAS[:, None].expand(-1, n))
    z = gate.train()()
    p_nonzero = (z > 0).double().mean(1)
    p_one = (z == 1).double().mean(1)
    want_nonzero = expected_l0(LOG_ALPHAS)
    # P(z = 1): the stretched sample reaches 1 when s ≥ (1 − γ)/(ζ − γ).
    want_one = torch.sigmoid(LOG_ALPHAS - BETA * math.log((1 - GAMMA) / (ZETA - 1)))
    tolerance = 4 * (0.25 / n) ** 0.5  # four binomial standard deviations at worst
    assert (p_nonzero - want_nonzero).abs().max() < tolerance
    assert (p_one - want_one).abs().max() < tolerance
    assert ((z >= 0) & (z <= 1)).all()


def test_sample_is_differentiable_in_log_alpha():
    u = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    log_alpha = torch.tensor([-0.3, 0.1, 0.4], dtype=torch.float64, requires_grad=True)  # inside the clamp
    assert torch.autograd.gradcheck(lambda a: sample_gate(a, u), (log_alpha,))
    assert torch.autograd.gradcheck(expected_l0, (log_alpha,))


def test_gates_start_open_and_eval_is_deterministic():
    gate = HardConcreteGate((4, 16))
    assert torch.equal(gate.eval()(), torch.ones(4, 16))
    assert torch.equal(gate(), gate())
    assert float(gate.expected_l0().detach().min()) > 0.98
    assert _ref_deterministic(open_log_alpha()) == pytest.approx(1.0)
    assert _ref_deterministic(open_log_alpha() - 0.01) < 1.0


def test_bad_stretch_is_rejected():
    with pytest.raises(ValueError, match="gamma"):
        HardConcreteGate((2,), gamma=0.1)
