"""Start mask experts from a clustering of the tokens: expert e serves the tokens nearest to k-means centroid e.

Per FFN layer, the FFN inputs of calibration tokens are clustered into E groups (k-means, FAISS). The router starts
as the nearest-centroid rule written as a linear layer, argmin_e ||x − c_e||² = argmax_e (2 c_e·x − ||c_e||²), so
it needs a bias. Every gate starts open (the deterministic gate is exactly 1, so step 0 still equals the dense
model), but not equally: within expert e, log α rises with the neuron's mean |activation| over e's tokens, from
just above open to `rank_spread` above that. Under the Lagrangian's uniform pressure the least used neurons of each
cluster then close first.

Why: trained from identical open masks and a random router, the experts barely differ (one static mask per layer
did as well as eight routed ones) and the router learns no useful split; see docs/masks.md for the figures.

Legend: T tokens, D model dim, I intermediate neurons, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.masks.method.ffn_inputs import collect_ffn_inputs, intermediate
from upcycle.masks.method.hard_concrete import open_log_alpha
from upcycle.masks.method.partition import PartitionedGates, assign_neurons, shared_neurons
from upcycle.masks.method.surgery import masked_ffns
from upcycle.ops.kmeans import kmeans_centroids, search

_OPEN_MARGIN = 0.1
"""How far above `open_log_alpha()` the least important neuron starts, so that it is open beyond rounding."""
_ROUTER_LOGIT_STD = 2.0
"""Spread the router's logits are scaled to (per token, across experts): a softmax neither flat nor one-hot, so
the chosen probability still carries a gradient if the routers are trained."""


@dataclass
class ClusterStart:
    """Where one FFN layer's router and gates start."""

    centroids: torch.Tensor
    """[E, D] k-means centroids of the FFN's inputs."""
    router_weight: torch.Tensor
    """[E, D] the nearest-centroid rule's weight, scaled (see `_ROUTER_LOGIT_STD`)."""
    router_bias: torch.Tensor
    """[E] its bias."""
    importance: torch.Tensor
    """[E, I] mean |intermediate activation| of each neuron over each cluster's tokens."""


@torch.no_grad()
def cluster_starts(model: nn.Module, inputs: torch.Tensor, experts: int, max_tokens: int = 32768,
                   seed: int = 0) -> dict[str, ClusterStart]:
    """Per SwiGLU FFN of the (not yet masked) `model`, keyed by module name: its `ClusterStart`, from k-means of
    its inputs over the first `max_tokens` tokens of blocks `inputs` [N, L]."""
    ffns = dict(model.named_modules())
    starts = {}
    for name, x in collect_ffn_inputs(model, inputs, max_tokens=max_tokens).items():
        if x.shape[0] < experts:
            raise UserError(f"the cluster init needs at least --recipe.masks.experts ({experts}) training tokens, "
                            f"got {x.shape[0]}")
        x = x.float()
        points = x.numpy()
        found = kmeans_centroids(points, experts, seed=seed)  # [E, D]
        labels = torch.from_numpy(search(points, found, 1)[1][:, 0])  # [T] nearest centroid
        centroids = torch.from_numpy(np.asarray(found, dtype=np.float32))  # [E, D]
        weight, bias = 2.0 * centroids, -(centroids * centroids).sum(dim=1)
        spread = float((x @ weight.T + bias).std(dim=1).mean())
        scale = _ROUTER_LOGIT_STD / max(spread, 1e-12)  # leaves the argmax alone; sets the softmax's temperature
        mlp = ffns[name]
        magnitude = intermediate(mlp, x.to(mlp.gate_proj.weight)).abs().float().cpu()  # [T, I]
        sums = torch.zeros(experts, magnitude.shape[1]).index_add_(0, labels, magnitude)
        counts = torch.bincount(labels, minlength=experts).clamp_min(1)[:, None]
        starts[name] = ClusterStart(centroids, scale * weight, scale * bias, sums / counts)
    return starts


@torch.no_grad()
def apply_cluster_starts(model: nn.Module, starts: dict[str, ClusterStart], rank_spread: float,
                         partition_active: float | None = None) -> None:
    """Set every MaskedFFN's router to its nearest-centroid rule and its gates to open, importance-ranked log α.

    Partitioned gates (`upcycle.masks.method.partition`) first get their neuron assignment, with as many shared
    neurons as make a token use `partition_active` of the FFN; each neuron's rank is then by its importance in the
    group it was given (mean over clusters for a shared neuron, its expert's cluster otherwise).
    """
    low = open_log_alpha() + _OPEN_MARGIN
    for name, layer in masked_ffns(model):
        start, router = starts[name], layer.router.proj
        if router.bias is None:
            raise UserError("the cluster init needs routers with a bias (--masks.router_bias true)")
        router.weight.copy_(start.router_weight)
        router.bias.copy_(start.router_bias)
        importance = start.importance  # [E, I]
        if isinstance(layer.gates, PartitionedGates):
            if partition_active is None:
                raise ValueError("partitioned gates need the active share to size the shared block")
            experts, width = importance.shape
            assignment = assign_neurons(importance, shared_neurons(width, experts, layer.router.top_k,
                                                                   partition_active))
            layer.gates.assign(assignment)
            shared = assignment.all(dim=0)
            own = torch.where(shared, importance.mean(dim=0), (importance * assignment).amax(dim=0))
            importance = own[None, :]  # [1, I]
        rank = importance.argsort(dim=1).argsort(dim=1).float() / max(importance.shape[1] - 1, 1)  # in [0, 1]
        layer.gates.log_alpha.copy_(low + rank_spread * rank)
