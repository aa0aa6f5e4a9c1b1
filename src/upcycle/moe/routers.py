"""Routers: token choice (Switch top-1, GShard / ST-MoE top-2) and expert choice, all returning one `Routing`.

A routing is a flat list of (token, expert, gate) assignments in priority order, so every dispatcher handles every
router. Logits and probabilities are computed in float32 (or wider) whatever the model dtype.

Legend: T tokens, D model dim, E experts, K experts per token, C tokens per expert, N assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Where each token goes. Tensors on the input's device; `gate` carries the router's gradient."""

    token: torch.Tensor
    """[N] long: the token each assignment reads, in priority order (capacity dispatch fills slots in it)."""
    expert: torch.Tensor
    """[N] long: the expert of each assignment."""
    gate: torch.Tensor
    """[N] float32 (or float64): the weight of that expert's output in the token's output."""
    logits: torch.Tensor
    """[T, E] router logits in float32 or wider (padding rows included; `valid` says which count)."""
    probs: torch.Tensor
    """[T, E] softmax of the logits, same dtype."""
    valid: torch.Tensor | None
    """[T] bool, False for padding; None means every token is real."""
    choices: torch.Tensor | None
    """[T, K] long: each token's top-k experts before any policy or capacity (None for expert choice)."""
    per_token: int | None
    """k for token-choice routing (None for expert choice)."""
    capacity: int | None = None
    """Slots per expert fixed by the router (expert choice); None lets the dispatcher compute C."""
    complete: bool = False
    """True when the assignments are all K choices of every token, choice-major and nothing skipped: assignment n is
    choice n // T of token n % T (N = K * T). Dispatchers then move rows by permutations and combine by a reshape."""

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens routed."""
        return self.logits.shape[0] if self.valid is None else int(self.valid.sum())

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]


class TopKRouter(nn.Module):
    """Token choice: each token goes to its k most probable experts (Switch with k=1, GShard / ST-MoE with k=2)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, normalize_gates: bool = True,
                 jitter_noise: float = 0.0, second_expert_policy: str = "all", init_std: float = 0.02) -> None:
        super().__init__()
        self.top_k, self.normalize_gates = top_k, normalize_gates
        self.jitter_noise, self.second_expert_policy = jitter_noise, second_expert_policy
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> Routing:
        """x [T, D], valid [T] bool or None -> Routing with at most K assignments per real token.

        Legend: T tokens, D model dim, E experts, K experts per token, N assignments.
        """
        logits, probs = router_probs(x, self.weight, self.jitter_noise if self.training else 0.0)  # [T, E] each
        top_p, choices = probs.topk(self.top_k, dim=-1)  # [T, K] each
        gates = normalized_gates(top_p) if self.normalize_gates else top_p  # [T, K]

        random_second = self.training and self.second_expert_policy == "random" and self.top_k > 1
        if not random_second and (valid is None or bool(valid.all())):  # every choice of every token is kept
            token = torch.arange(x.shape[0], device=x.device).repeat(self.top_k)  # [N = K*T], choice-major
            return Routing(token=token, expert=choices.T.reshape(-1), gate=gates.T.reshape(-1), logits=logits,
                           probs=probs, valid=valid, choices=choices, per_token=self.top_k, complete=True)

        keep = torch.ones_like(choices, dtype=torch.bool)  # [T, K]
        if valid is not None:
            keep &= valid[:, None]  # padding is never routed, so it takes no capacity
        if random_second:
            # GShard: send a non-first choice only with probability 2 * g (its gate stays as it was).
            keep[:, 1:] &= torch.rand_like(gates[:, 1:]) < 2 * gates[:, 1:].detach()

        # Choice-major priority: every token's first choice comes before any second choice (GShard, Switch).
        keep_by_choice = keep.T  # [K, T]
        token = torch.arange(x.shape[0], device=x.device).expand(self.top_k, -1)[keep_by_choice]  # [N]
        return Routing(token=token, expert=choices.T[keep_by_choice], gate=gates.T[keep_by_choice], logits=logits,
                       probs=probs, valid=valid, choices=choices, per_token=self.top_k)


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Zhou et al. 2022): each expert takes the C tokens with the highest p for it, C = cf * T / E.

    A token may get 0..E experts. Choosing looks at every token of the batch, so it is not causal: use it for
    training and batch scoring, not for token-by-token decoding.
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 1.0, eval_capacity_factor: float = 2.0,
                 jitter_noise: float = 0.0, init_std: float = 0.02) -> None:
        super().__init__()
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.jitter_noise = jitter_noise
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> Routing:
        """x [T, D], valid [T] bool or None -> Routing with exactly C assignments per expert, expert-major.

        Legend: T tokens, D model dim, E experts, C tokens per expert, N = E * C assignments.
        """
        logits, probs = router_probs(x, self.weight, self.jitter_noise if self.training else 0.0)  # [T, E] each
        num_tokens, num_experts = probs.shape
        real = num_tokens if valid is None else int(valid.sum())
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = min(real, math.ceil(factor * real / num_experts))
        scores = probs.detach() if valid is None else probs.detach().masked_fill(~valid[:, None], -1.0)  # [T, E]
        token = scores.T.topk(capacity, dim=-1).indices  # [E, C]
        expert = torch.arange(num_experts, device=x.device)[:, None].expand_as(token)  # [E, C]
        gate = probs[token, expert]  # [E, C], differentiable
        return Routing(token=token.reshape(-1), expert=expert.reshape(-1), gate=gate.reshape(-1), logits=logits,
                       probs=probs, valid=valid, choices=None, per_token=None, capacity=capacity)


def normalized_gates(top_p: torch.Tensor) -> torch.Tensor:
    """[T, K] chosen probabilities -> gates summing to 1 per token.

    For K >= 2 that is p / sum(p). For K = 1 the gate is constantly 1, which would give the router no gradient from
    the task, so it is 1 in value with the gradient of p (straight-through: 1 + p - stop_grad(p)); the router then
    learns exactly as Switch's gate = p would make it, while the layer's output is the expert's, unscaled (so an
    upcycled top-1 model starts equal to the dense one).
    """
    if top_p.shape[-1] == 1:
        return top_p - top_p.detach() + 1.0
    return top_p / top_p.sum(dim=-1, keepdim=True)


def router_probs(x: torch.Tensor, weight: torch.Tensor, jitter_noise: float = 0.0):
    """Router logits and softmax in at least float32: x [T, D], weight [E, D] -> ([T, E], [T, E]).

    bfloat16 / float16 inputs are routed in float32 (float64 stays float64, for the reference tests). Jitter
    multiplies only the router's input (Switch); the experts still see the clean x.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if jitter_noise > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - jitter_noise, 1.0 + jitter_noise)
    logits = F.linear(x, weight.to(dtype))  # [T, E]
    return logits, logits.softmax(dim=-1)
