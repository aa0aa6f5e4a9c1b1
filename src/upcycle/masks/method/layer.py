"""A Hugging Face SwiGLU MLP wrapped with mask experts (MoM): the FFN keeps its weights, experts are neuron masks.

Each of E experts is a hard-concrete mask over the I intermediate neurons. A token router picks experts per token;
the token's neuron mask is the union (max) of its chosen experts' masks (top-k) or their probability-weighted mix
(soft). The wrapped MLP's projections are registered under their original names, so the base weights keep their
state-dict keys and only `router.*` and `gates.*` are new.

Legend: B batch, L sequence, T = B·L tokens, D model dim, I intermediate neurons, E experts, K chosen experts.
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.masks.config import MaskConfig
from upcycle.masks.method.hard_concrete import HardConcreteGate
from upcycle.masks.method.partition import PartitionedGates
from upcycle.masks.method.router import MaskRouting, TokenRouter


class MaskedFFN(nn.Module):
    """SwiGLU FFN (gate_proj, up_proj, down_proj, act_fn) whose intermediate neurons are gated per token."""

    def __init__(self, mlp: nn.Module, router: TokenRouter, gates: HardConcreteGate | PartitionedGates) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        shape = (router.num_experts, self.gate_proj.out_features)
        if tuple(gates.expected_l0().shape) != shape:
            raise ValueError(f"gates must be {list(shape)}, got {list(gates.expected_l0().shape)}")
        self.router, self.gates = router, gates

    @classmethod
    def wrap(cls, mlp: nn.Module, config: MaskConfig) -> MaskedFFN:
        """Wrap `mlp` with a fresh router and fully open gates as described by `config`."""
        hidden, intermediate = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        weight = mlp.gate_proj.weight
        router = TokenRouter(hidden, config.experts, config.top_k, config.routing, config.router_bias)
        if config.layout == "partition":
            gates = PartitionedGates(config.experts, intermediate, config.init_log_alpha, config.init_noise)
        else:
            gates = HardConcreteGate((config.experts, intermediate), config.init_log_alpha, config.init_noise)
        # Gates stay at least float32 even in a bf16 model: log α moves by small steps and must not round away.
        gates = gates.to(weight.device, torch.promote_types(weight.dtype, torch.float32))
        return cls(mlp, router.to(weight.device, weight.dtype), gates)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def intermediate_size(self) -> int:
        return self.gate_proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]."""
        flat = x.reshape(-1, x.shape[-1])  # [T, D]
        mask = self.token_mask(self.router(flat), self.gates())  # [T, I]
        h = self.act_fn(self.gate_proj(flat)) * self.up_proj(flat) * mask.to(flat.dtype)
        return self.down_proj(h).view(x.shape)

    @staticmethod
    def token_mask(routing: MaskRouting, gates: torch.Tensor) -> torch.Tensor:
        """Per-token neuron mask [T, I] from a routing and gate values [E, I]."""
        weights = routing.weights.to(gates.dtype)
        if routing.expert_idx is None:  # soft: sum_e p[t, e]·z[e, i]
            return weights @ gates
        chosen = gates[routing.expert_idx]  # [T, K, I]
        return (weights[..., None] * chosen).amax(dim=1)  # union of the chosen masks

    def expected_active(self, x: torch.Tensor) -> torch.Tensor:
        """Expected fraction of the I neurons each token of x [..., D] uses, averaged over tokens (a scalar).

        A gate is non-zero with probability expected_l0; a top-k token's neuron is on unless all K chosen gates are
        off (gates independent); a soft token's expected mask is the probability-weighted mix.
        """
        routing = self.router(x.reshape(-1, x.shape[-1]))
        l0 = self.gates.expected_l0()  # [E, I]
        weights = routing.weights.to(l0.dtype)
        if routing.expert_idx is None:
            return (weights @ l0.mean(dim=1)).mean()
        off = 1.0 - weights[..., None] * l0[routing.expert_idx]  # [T, K, I]
        return (1.0 - off.prod(dim=1)).mean()

    @torch.no_grad()
    def eval_gates(self) -> torch.Tensor:
        """The deterministic (test-time) gate values [E, I]."""
        return self.gates.deterministic()
