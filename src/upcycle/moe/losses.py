"""Router auxiliary losses: Switch load balancing and ST-MoE router z-loss, per layer and averaged over layers.

Legend: T tokens, E experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from upcycle.moe.routers import Routing


@dataclass
class AuxLosses:
    """One layer's unweighted auxiliary losses (scalars that keep the router's graph)."""

    balance: torch.Tensor
    """E * sum_i f_i P_i; 1 when perfectly balanced, E when every token picks one expert with certainty."""
    z: torch.Tensor
    """mean over real tokens of logsumexp(logits)^2."""


def load_balancing_loss(probs: torch.Tensor, choices: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load balancing E * sum_i f_i P_i for one layer, without the alpha weight.

    probs [T, E] router softmax; choices [T, K] each token's top-k experts; valid [T] bool (None: all real).
    f_i is the fraction of the real tokens' top-k choices that are expert i: every one of the k choices counts (as
    in Mixtral), divided by k so that sum_i f_i = 1 and the balanced value is 1 for every k. It counts the router's
    choices before capacity or the random second-expert policy, so dropping does not hide an imbalance.
    P_i is the mean of p_i over the real tokens. Only P carries gradient (f comes from an argmax).
    """
    num_experts, top_k = probs.shape[1], choices.shape[1]
    weight = probs.new_ones(probs.shape[0]) if valid is None else valid.to(probs.dtype)  # [T]
    real = weight.sum().clamp_min(1.0)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, choices.reshape(-1), weight.repeat_interleave(top_k))  # [E] choices per expert
    f = counts / (real * top_k)  # [E]
    p_mean = (probs * weight[:, None]).sum(dim=0) / real  # [E]
    return num_experts * (f * p_mean).sum()


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss mean(logsumexp(logits)^2) over real tokens, without the beta weight: logits [T, E]."""
    z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).square()  # [T]
    if valid is None:
        return z.mean()
    weight = valid.to(z.dtype)
    return (z * weight).sum() / weight.sum().clamp_min(1.0)


def routing_losses(routing: Routing) -> AuxLosses:
    """Both losses of one layer's routing. Expert choice is balanced by construction: its balance term is 0."""
    if routing.choices is None:
        balance = routing.probs.new_zeros(())
    else:
        balance = load_balancing_loss(routing.probs, routing.choices, routing.valid)
    return AuxLosses(balance=balance, z=router_z_loss(routing.logits, routing.valid))


def combine_aux_losses(layers: Sequence[AuxLosses], balance_coef: float, z_coef: float) -> torch.Tensor:
    """alpha * mean_l balance_l + beta * mean_l z_l over L MoE layers (0 when there are none).

    Each layer's balance term uses only that layer's f and P: pooling f and P over layers before the product (as
    transformers' load_balancing_loss_func does) rewards layers whose imbalances cancel each other out.
    """
    if not layers:
        return torch.zeros(())
    balance = torch.stack([layer.balance for layer in layers]).mean()
    z = torch.stack([layer.z for layer in layers]).mean()
    return balance_coef * balance + z_coef * z
