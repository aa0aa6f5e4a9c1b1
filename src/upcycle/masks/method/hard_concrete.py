"""Hard-concrete (L0) gates (Louizos et al. 2018): a relaxed Bernoulli that puts real mass on exactly 0 and 1.

A gate with parameter log α draws u ~ U(0, 1) and computes
    s = sigmoid((log u − log(1 − u) + log α) / β),   s̄ = s·(ζ − γ) + γ,   z = clamp(s̄, 0, 1).
Stretching s to (γ, ζ) ⊃ [0, 1] and clamping gives P(z = 0) > 0 and P(z = 1) > 0, so the gate can switch a neuron
off exactly while staying differentiable in log α. The probability that the gate is non-zero, the expected L0
"norm", is sigmoid(log α − β·log(−γ/ζ)); the penalty on it is what drives sparsity. At evaluation the gate is
deterministic: z = clamp(sigmoid(log α)·(ζ − γ) + γ, 0, 1).

The functional forms below take log α explicitly so the tests can check them against a float64 reference; the
`HardConcreteGate` module owns the parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA = 2.0 / 3.0
"""Temperature of the concrete relaxation (Louizos et al. use 2/3)."""
GAMMA = -0.1
"""Lower end of the stretch interval (must be < 0 so that z = 0 has mass)."""
ZETA = 1.1
"""Upper end of the stretch interval (must be > 1 so that z = 1 has mass)."""
INIT_LOG_ALPHA = 3.0
"""Default initial log α: the deterministic gate is exactly 1 (that needs log α ≥ `open_log_alpha()` = log 11 ≈ 2.40)
and a sampled gate is non-zero with probability ≈ 0.99, so training starts from the dense FFN."""

# Uniform samples are kept inside (eps, 1 − eps) so that log u and log(1 − u) stay finite.
_EPS = 1e-6


def open_log_alpha(gamma: float = GAMMA, zeta: float = ZETA) -> float:
    """Smallest log α whose deterministic gate is exactly 1: sigmoid(log α)·(ζ − γ) + γ = 1."""
    p = (1.0 - gamma) / (zeta - gamma)
    return math.log(p / (1.0 - p))


def closed_log_alpha(gamma: float = GAMMA, zeta: float = ZETA) -> float:
    """Largest log α whose deterministic gate is exactly 0: sigmoid(log α)·(ζ − γ) + γ = 0."""
    p = -gamma / (zeta - gamma)
    return math.log(p / (1.0 - p))


def sample_gate(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
                zeta: float = ZETA) -> torch.Tensor:
    """Hard-concrete sample z for uniform noise `u` (same shape as log α or broadcastable to it)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Test-time gate: clamp(sigmoid(log α)·(ζ − γ) + γ, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """P(z ≠ 0) per gate: sigmoid(log α − β·log(−γ/ζ)). Differentiable in log α."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


class HardConcreteGate(nn.Module):
    """A tensor of independent hard-concrete gates of `shape` (e.g. [E experts, I neurons]).

    `forward()` returns a sample in training mode (fresh noise each call) and the deterministic gate in eval mode.
    """

    def __init__(self, shape: tuple[int, ...], init_log_alpha: float = INIT_LOG_ALPHA, init_noise: float = 0.0,
                 beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> None:
        super().__init__()
        if not gamma < 0.0 < 1.0 < zeta:
            raise ValueError(f"need gamma < 0 and zeta > 1 for the stretch, got gamma={gamma}, zeta={zeta}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        log_alpha = torch.full(shape, float(init_log_alpha))
        if init_noise:  # a little noise breaks the symmetry between otherwise identical experts
            log_alpha += init_noise * torch.randn(shape)
        self.log_alpha = nn.Parameter(log_alpha)
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def forward(self) -> torch.Tensor:
        """Gate values, shape of log α: sampled in training, deterministic in eval."""
        if self.training:
            return self.sample()
        return self.deterministic()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh hard-concrete sample (differentiable in log α)."""
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device,
                       dtype=self.log_alpha.dtype).clamp(_EPS, 1.0 - _EPS)
        return sample_gate(self.log_alpha, u, self.beta, self.gamma, self.zeta)

    def deterministic(self) -> torch.Tensor:
        """The test-time gate."""
        return deterministic_gate(self.log_alpha, self.gamma, self.zeta)

    def expected_l0(self) -> torch.Tensor:
        """P(gate ≠ 0), shape of log α."""
        return expected_l0(self.log_alpha, self.beta, self.gamma, self.zeta)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}, beta={self.beta:.3g}, gamma={self.gamma}, zeta={self.zeta}"
