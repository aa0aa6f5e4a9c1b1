"""E SwiGLU feed-forward experts with stacked weights, in the two layouts the dispatchers feed them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.errors import UserError
from upcycle.ops.grouped_experts import Activation, batched_swiglu, grouped_swiglu, resolve_backend

ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class SwiGLUExperts(nn.Module):
    """E gated FFNs, expert e: y = (act(x W_gate[e]) * x W_up[e]) W_down[e].

    Weights are stored input-major so both layouts multiply them without a transpose:
    w_in [E, D, 2F] holds W_gate in its first F columns and W_up in the last F; w_out [E, F, D].
    """

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, activation: str = "silu",
                 backend: str = "auto", init_std: float = 0.02) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"unsupported expert activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.activation_name, self.backend = activation, backend
        self.activation = ACTIVATIONS[activation]
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * ffn_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std)

    def forward_sorted(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [S, D] sorted by expert, counts [E] rows per expert -> [S, D] (dropless layout)."""
        return grouped_swiglu(x, self.w_in, self.w_out, counts, self.activation, self.backend)

    def pads(self, x: torch.Tensor, counts: torch.Tensor) -> bool:
        """Whether forward_sorted would pad the segments into one batched matmul (then feed forward_buffer)."""
        return resolve_backend(self.backend, x, self.w_in, self.w_out, counts=counts) == "padded_bmm"

    def forward_buffer(self, buffer: torch.Tensor) -> torch.Tensor:
        """buffer [E, C, D], row block e for expert e -> [E, C, D] (fixed-capacity layout)."""
        return batched_swiglu(buffer, self.w_in, self.w_out, self.activation)

    @torch.no_grad()
    def load_dense(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, expert: int | None = None) -> None:
        """Copy one dense SwiGLU (nn.Linear weights: gate/up [F, D], down [D, F]) into `expert` (None: all)."""
        experts = range(self.num_experts) if expert is None else [expert]
        for e in experts:
            self.w_in[e, :, : self.ffn_dim].copy_(gate.T)
            self.w_in[e, :, self.ffn_dim :].copy_(up.T)
            self.w_out[e].copy_(down.T)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, dim={self.dim}, ffn_dim={self.ffn_dim}, act={self.activation_name}"
