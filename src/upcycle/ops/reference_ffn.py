"""Plain-torch reference for the masked SwiGLU FFN: slow, obviously right, float64-friendly.

The fast kernel in `upcycle.ops.sparse_ffn` must agree with these functions; the tests compare them over a grid of
sizes and dtypes. Legend: T tokens, D model dim, I intermediate (FFN) neurons, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def reference_masked_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                         mask: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """SwiGLU FFN with a per-token neuron mask. x [T, D], w_gate/w_up [I, D], w_down [D, I], mask [T, I] -> [T, D].

    Semantics, as a loop:

        for t in range(T):
            y[t] = 0
            for i in range(I):
                if mask[t, i] != 0:
                    y[t] += mask[t, i] * act(w_gate[i] · x[t]) * (w_up[i] · x[t]) * w_down[:, i]

    A neuron whose mask is 0 contributes exactly nothing, which is what lets the fast kernel skip it. Computed here
    densely (every neuron, then multiplied by its mask).
    """
    return F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up) * mask, w_down)


def union_mask(shared: torch.Tensor, experts: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
    """Per-token mask when each token uses the union of its K chosen experts. -> [T, I].

    shared [I] (value of the neurons every token uses), experts [E, I] (each expert's routed neuron values, zero
    where shared is non-zero), expert_idx [T, K]:

        m[t, i] = shared[i] + max_k experts[expert_idx[t, k], i]
    """
    if expert_idx.shape[1] == 0:
        return shared.expand(expert_idx.shape[0], -1).clone()
    return shared + experts[expert_idx].amax(dim=1)  # experts[expert_idx]: [T, K, I]


def mixture_mask(shared: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token mask when every expert contributes in proportion to a routing weight. -> [T, I].

    shared [I], experts [E, I], weights [T, E]:

        m[t, i] = shared[i] + sum_e weights[t, e] * experts[e, i]
    """
    return shared + weights @ experts
