"""MoEfication (Zhang et al. 2022): split each FFN's neurons into E experts by balanced k-means over the neurons'
input-weight rows, then fit a small router to predict, per token, which experts matter most. A token computes only
its top-k experts' neurons (active ratio k / E); the model's weights do not change.

The router (a linear layer on the FFN input) is fitted through the shared training loop to the experts whose
intermediate activations have the largest L1 norm on calibration tokens (multi-label, binary cross-entropy).
The result uses the same compact layer as the mask experts, so speed and FLOPs compare like for like.

Legend: T tokens, D model dim, I intermediate neurons, E experts, K chosen experts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.errors import UserError
from upcycle.masks.method.compact import CompactFFN
from upcycle.masks.method.ffn_inputs import collect_ffn_inputs, intermediate
from upcycle.masks.method.router import TokenRouter
from upcycle.models.surgery import find_ffns, replace_module
from upcycle.ops.kmeans import balanced_kmeans, equal_sizes
from upcycle.ops.sparse_ffn import SparseFFN
from upcycle.training.config import TrainConfig
from upcycle.training.loop import train

log = logging.getLogger(__name__)


@dataclass
class MoEficationConfig:
    """How the FFNs are split and routed."""

    experts: int = 8
    """Experts per FFN (neuron clusters of equal size)."""
    top_k: int = 4
    """Experts each token computes; the active ratio is top_k / experts."""
    kmeans_iterations: int = 10
    """Balanced k-means iterations over the (normalised) gate-projection rows."""
    calibration_tokens: int = 8192
    """Tokens whose FFN inputs the routers are fitted to."""
    router: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=256, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1, grad_clip=0.0))
    """Router fitting through the shared loop (a batch is `batch_size` tokens)."""
    seed: int = 0
    """Seed for k-means and the routers."""

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise UserError(f"MoEfication needs >= 1 expert, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"MoEfication top_k must be between 1 and experts ({self.experts}), got {self.top_k}")


def cluster_neurons(mlp: nn.Module, experts: int, iterations: int, seed: int) -> torch.Tensor:
    """Expert of each intermediate neuron [I], from balanced k-means over the unit-normalised gate rows: clusters of
    exactly I // E neurons (the first I % E one more), started from E rows drawn with `seed`."""
    rows = F.normalize(mlp.gate_proj.weight.detach().float(), dim=1).double()  # [I, D]
    n = rows.shape[0]
    if not 1 <= experts <= n:
        raise ValueError(f"need 1 <= clusters <= points, got {experts} clusters for {n} points")
    start = rows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:experts]]  # [E, D]
    _, assignment = balanced_kmeans(rows.numpy(), start.numpy(), equal_sizes(n, experts), iterations)
    return torch.from_numpy(assignment)


@torch.no_grad()
def expert_targets(mlp: nn.Module, x: torch.Tensor, assignment: torch.Tensor, experts: int, top_k: int) -> torch.Tensor:
    """Multi-hot [T, E] of each token's top-k experts by the L1 norm of their intermediate activations."""
    h = intermediate(mlp, x.to(mlp.gate_proj.weight.dtype)).abs().float()  # [T, I]
    scores = torch.zeros(x.shape[0], experts).index_add_(1, assignment, h)  # [T, E]
    return torch.zeros_like(scores).scatter_(1, scores.topk(top_k, dim=1).indices, 1.0)


def fit_router(x: torch.Tensor, targets: torch.Tensor, top_k: int, config: TrainConfig,
               bias: bool = True) -> tuple[TokenRouter, float]:
    """A linear top-k router fitted to multi-hot targets [T, E]. Returns it and its top-k recall on x."""
    router = TokenRouter(x.shape[1], targets.shape[1], top_k, "topk", bias=bias)

    def loss_fn(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return F.binary_cross_entropy_with_logits(module.proj(inputs), labels), {}

    train(router, (x.float(), targets), config, loss_fn=loss_fn, description="moefication router")
    chosen = router.choose(x.float())
    recall = float(targets.gather(1, chosen).sum() / targets.sum())
    return router, recall


def moefy(model: nn.Module, calibration: torch.Tensor, config: MoEficationConfig) -> dict[str, dict]:
    """Replace every SwiGLU FFN of `model` by a MoEfied compact layer (in place). Returns per-layer statistics.

    calibration: token blocks [N, L] whose FFN inputs the routers are fitted to.
    """
    inputs = collect_ffn_inputs(model, calibration, max_tokens=config.calibration_tokens)
    torch.manual_seed(config.seed)
    stats = {}
    for name, mlp in find_ffns(model):
        assignment = cluster_neurons(mlp, config.experts, config.kmeans_iterations, config.seed)
        x = inputs[name]
        targets = expert_targets(mlp, x, assignment, config.experts, config.top_k)
        router, recall = fit_router(x, targets, config.top_k, config.router)
        masks = F.one_hot(assignment, config.experts).t().to(mlp.gate_proj.weight.dtype)  # [E, I]
        ffn = SparseFFN.from_dense(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(),
                                   mlp.down_proj.weight.detach(), masks.new_zeros(masks.shape[1]), masks, mlp.act_fn)
        weight = mlp.gate_proj.weight
        replace_module(model, name, CompactFFN(router.to(weight.device, weight.dtype), ffn).eval())
        stats[name] = {"router_recall": recall, "expert_sizes": torch.bincount(assignment).tolist()}
        log.info("%s: MoEfied into %d experts, router top-%d recall %.2f", name, config.experts, config.top_k, recall)
    return stats
