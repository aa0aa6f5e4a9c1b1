"""The partitioned layout of mask experts: every FFN neuron is shared, belongs to exactly one expert, or is dropped.

In the 'overlap' layout each expert's mask may keep any neuron, so a compacted model stores a neuron once per expert
that keeps it (about 60x the dense FFN with 128 experts on the tiny base) and cannot be faster than dense. Here each
neuron is given one place before training, from the 'clusters' init's statistics:

    shared     the neurons most active over all tokens; every token uses them
    expert e   of the rest, the neurons most active on the tokens of cluster e (equal-sized blocks)

and one hard-concrete gate per neuron learns which of them to switch off. Expert e's mask is gate ⊙ (shared ∪ e),
so compaction (`upcycle.masks.method.compact.split_gates`) finds a shared block and disjoint routed blocks by
construction: the compacted FFN stores every kept neuron once, each block contiguous, and a token computes the
shared block plus one slice per chosen expert, with no per-token gathers (`upcycle.ops.sparse_ffn.SparseFFN`).

Shared size: with top-k routing over E experts and s of the I neurons shared, a token uses s + k·(I − s)/E neurons
while every gate is open. s is chosen so that this equals the target plus `slack`, which leaves the gates that
share of the FFN to close (the ranking the training learns).

Legend: I intermediate neurons, E experts, k experts chosen per token.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from upcycle.masks.method.hard_concrete import HardConcreteGate
from upcycle.ops.kmeans import equal_sizes


class PartitionedGates(nn.Module):
    """One hard-concrete gate per neuron [1, I] and a fixed neuron-to-expert assignment [E, I] (1: the expert may
    use the neuron). Same interface as `HardConcreteGate` of shape [E, I]: the expert masks are gate ⊙ assignment.

    The assignment starts all ones (every neuron shared: the dense FFN) until `assign` sets it.
    """

    def __init__(self, experts: int, intermediate: int, init_log_alpha: float, init_noise: float = 0.0) -> None:
        super().__init__()
        self.gate = HardConcreteGate((1, intermediate), init_log_alpha, init_noise)
        self.register_buffer("assignment", torch.ones(experts, intermediate))

    @property
    def log_alpha(self) -> nn.Parameter:
        """[1, I] one log α per neuron (calibration shifts it, the cluster init sets it)."""
        return self.gate.log_alpha

    def forward(self) -> torch.Tensor:
        """[E, I] expert masks: a sample in training, deterministic in eval (one draw per neuron, shared by every
        expert that may use it)."""
        return self.gate() * self.assignment

    def deterministic(self) -> torch.Tensor:
        return self.gate.deterministic() * self.assignment

    def expected_l0(self) -> torch.Tensor:
        return self.gate.expected_l0() * self.assignment

    @torch.no_grad()
    def assign(self, assignment: torch.Tensor) -> None:
        """Set the [E, I] assignment (bool or 0/1)."""
        self.assignment.copy_(assignment.to(self.assignment.dtype))


def shared_neurons(intermediate: int, experts: int, top_k: int, active: float) -> int:
    """Shared neurons s such that s + k·(I − s)/E = active·I (clipped to [0, I]): the open layout's active share."""
    if top_k >= experts:
        return intermediate
    routed_share = top_k / experts
    s = intermediate * (active - routed_share) / (1.0 - routed_share)
    return int(round(min(max(s, 0.0), float(intermediate))))


def assign_neurons(importance: torch.Tensor, shared: int) -> torch.Tensor:
    """[E, I] bool assignment from importance [E, I] (mean |activation| of each neuron on each cluster's tokens).

    The `shared` neurons with the largest mean importance over the clusters are shared (True in every row). Each
    remaining neuron goes to one expert, greedily in descending order of its relative importance
    importance[e, i] / Σ_e importance[e, i], under equal capacities (`upcycle.ops.kmeans.equal_sizes`).
    """
    experts, intermediate = importance.shape
    scores = importance.double().cpu().numpy()
    order = np.argsort(-scores.mean(axis=0), kind="stable")
    assignment = np.zeros((experts, intermediate), dtype=bool)
    assignment[:, order[:shared]] = True
    routed = order[shared:]
    if len(routed):
        relative = scores[:, routed] / np.maximum(scores[:, routed].sum(axis=0, keepdims=True), 1e-30)  # [E, n]
        room = equal_sizes(len(routed), experts)
        taken = np.zeros(len(routed), dtype=bool)
        flat = np.argsort(-relative, axis=None, kind="stable")  # (expert, neuron) pairs, most relative first
        for expert, column in zip(*np.unravel_index(flat, relative.shape)):
            if not taken[column] and room[expert]:
                assignment[expert, routed[column]] = True
                taken[column], room[expert] = True, room[expert] - 1
    return torch.from_numpy(assignment)
