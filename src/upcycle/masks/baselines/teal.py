"""TEAL-style training-free activation sparsity (Liu et al. 2024): zero the small-magnitude entries of each FFN's
input and of its intermediate activations, with per-layer thresholds calibrated so that a target fraction stays.

Zeroed inputs let an input-sparse matvec skip the matching weight columns (gate/up columns for the input, down
columns for the intermediate). Batched input runs densely with the zeros applied (the plain reference); a single
token (decode) takes `upcycle.ops.sparse_ffn.input_sparse_ffn`, which reads only the kept rows of transposed
copies of the weights (a gather, not a fused kernel like TEAL's).
"""

from __future__ import annotations

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.masks.method.ffn_inputs import collect_ffn_inputs, intermediate
from upcycle.models.surgery import find_ffns, replace_module
from upcycle.ops.sparse_ffn import input_sparse_ffn

_QUANTILE_SAMPLE = 1 << 20  # torch.quantile needs a bounded input; a million magnitudes pin a quantile well


class ThresholdFFN(nn.Module):
    """SwiGLU FFN whose input entries with |x| <= tau_in and intermediate entries with |h| <= tau_mid are zeroed."""

    def __init__(self, mlp: nn.Module, tau_in: float, tau_mid: float) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.register_buffer("tau_in", torch.tensor(float(tau_in)))
        self.register_buffer("tau_mid", torch.tensor(float(tau_mid)))
        with torch.no_grad():  # row-major copies for the decode path: a kept input or activation is one row
            self.register_buffer("w_gate_up_t", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous())
            self.register_buffer("w_down_t", mlp.down_proj.weight.t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]; one token without autograd takes the input-sparse path."""
        if x.shape[:-1].numel() == 1 and not torch.is_grad_enabled():
            y = input_sparse_ffn(x.reshape(-1), self.w_gate_up_t, self.w_down_t, self.tau_in, self.tau_mid, self.act_fn)
            return y.view(x.shape)
        x, h = self._thresholded(x)
        return self.down_proj(h)

    def _thresholded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input with small entries zeroed, intermediate activations with small entries zeroed)."""
        x = torch.where(x.abs() > self.tau_in, x, torch.zeros_like(x))
        h = intermediate(self, x)
        return x, torch.where(h.abs() > self.tau_mid, h, torch.zeros_like(h))

    @torch.no_grad()
    def active_fraction(self, x: torch.Tensor) -> float:
        """Fraction of the FFN's weights read per token for x [T, D]: gate and up rows of the kept inputs (2 of the
        3 matrices) and down rows of the kept activations (the third), averaged over tokens."""
        x, h = self._thresholded(x)
        return float((2 * (x != 0).double().mean() + (h != 0).double().mean()) / 3)


def _magnitude_quantile(values: torch.Tensor, q: float, seed: int) -> float:
    flat = values.abs().reshape(-1).float()
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:_QUANTILE_SAMPLE]]
    return float(torch.quantile(flat, q))


@torch.no_grad()
def sparsify_activations(model: nn.Module, calibration: torch.Tensor, keep: float, seed: int = 0) -> dict[str, dict]:
    """Swap every SwiGLU FFN for a ThresholdFFN keeping about `keep` of its input and intermediate entries.

    Thresholds are the (1 − keep) magnitude quantiles on the calibration blocks [N, L]. Returns the thresholds.
    """
    if not 0.0 < keep <= 1.0:
        raise UserError(f"the fraction of activations to keep must be in (0, 1], got {keep}")
    inputs = collect_ffn_inputs(model, calibration)
    thresholds = {}
    for name, mlp in find_ffns(model):
        x = inputs[name].to(mlp.gate_proj.weight.dtype)
        tau_in = _magnitude_quantile(x, 1.0 - keep, seed) if keep < 1 else -1.0
        x_kept = torch.where(x.abs() > tau_in, x, torch.zeros_like(x))
        tau_mid = _magnitude_quantile(intermediate(mlp, x_kept), 1.0 - keep, seed) if keep < 1 else -1.0
        replace_module(model, name, ThresholdFFN(mlp, tau_in, tau_mid))
        thresholds[name] = {"tau_in": tau_in, "tau_mid": tau_mid}
    return thresholds
