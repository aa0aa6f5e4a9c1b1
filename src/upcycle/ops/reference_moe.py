"""Slow, plain references for the MoE fast paths: loops over tokens and experts, float64-friendly.

Each docstring states the semantics the fast path must match; tests compare values and gradients over a grid of
sizes. Nothing here is meant to be fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_swiglu(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, act=F.silu) -> torch.Tensor:
    """One expert: x [.., D], w_in [D, 2F] (gate | up), w_out [F, D] -> (act(x W_gate) * x W_up) W_down."""
    ffn = w_out.shape[0]
    return (act(x @ w_in[:, :ffn]) * (x @ w_in[:, ffn:])) @ w_out


def reference_grouped_swiglu(x, w_in, w_out, counts, act=F.silu) -> torch.Tensor:
    """for each row r of the expert-sorted x [S, D]: out[r] = swiglu of the expert whose segment holds r."""
    out, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        for r in range(start, start + count):
            out.append(reference_swiglu(x[r], w_in[expert], w_out[expert], act))
        start += count
    return torch.stack(out) if out else x.new_zeros(0, w_out.shape[-1])


def reference_top_k(x, weight, k: int, normalize: bool, valid=None):
    """Token choice, token by token: p = softmax(W x) in the input dtype (float64 in tests); the k largest p.

    Returns a list of (token, expert, gate, choice_rank) for real tokens, gates renormalised over the k when asked.
    """
    assignments = []
    for t in range(x.shape[0]):
        if valid is not None and not bool(valid[t]):
            continue
        p = torch.softmax(weight @ x[t], dim=-1)
        top = torch.topk(p, k)
        total = top.values.sum()
        for rank in range(k):
            if not normalize:
                gate = top.values[rank]
            elif k == 1:  # value 1, gradient of p (straight-through, as the fast router)
                gate = top.values[rank] - top.values[rank].detach() + 1.0
            else:
                gate = top.values[rank] / total
            assignments.append((t, int(top.indices[rank]), gate, rank))
    return assignments


def reference_capacity_moe(x, weight, w_in, w_out, k: int, normalize: bool, capacity: int | None, valid=None):
    """Token-choice MoE with a capacity, by loops. Slots are filled choice-major: first every token's first choice
    (in token order), then every token's second choice, ...; an assignment whose expert already holds `capacity`
    tokens is dropped. capacity None: nothing is dropped. out[t] = sum over kept assignments of gate * expert(x_t).
    """
    assignments = reference_top_k(x, weight, k, normalize, valid)
    assignments.sort(key=lambda a: (a[3], a[0]))  # choice-major priority
    load = [0] * w_in.shape[0]
    out = [x.new_zeros(x.shape[1]) for _ in range(x.shape[0])]
    for t, e, gate, _ in assignments:
        if capacity is not None and load[e] >= capacity:
            continue
        load[e] += 1
        out[t] = out[t] + gate * reference_swiglu(x[t], w_in[e], w_out[e])
    return torch.stack(out), load


def reference_expert_choice_moe(x, weight, w_in, w_out, capacity_factor: float, valid=None):
    """Expert choice by loops: for each expert e, the C = ceil(cf * T_real / E) real tokens with the largest p_e
    each get gate p_e(t) * expert_e(x_t) added to their output."""
    num_experts = weight.shape[0]
    real = [t for t in range(x.shape[0]) if valid is None or bool(valid[t])]
    capacity = min(len(real), math.ceil(capacity_factor * len(real) / num_experts))
    probs = {t: torch.softmax(weight @ x[t], dim=-1) for t in real}
    out = [x.new_zeros(x.shape[1]) for _ in range(x.shape[0])]
    for e in range(num_experts):
        ranked = sorted(real, key=lambda t: float(probs[t][e].detach()), reverse=True)[:capacity]
        for t in ranked:
            out[t] = out[t] + probs[t][e] * reference_swiglu(x[t], w_in[e], w_out[e])
    return torch.stack(out)


def reference_load_balancing_loss(logits, k: int, valid=None):
    """E * sum_i f_i P_i by loops: f_i = (number of real tokens whose top-k includes i) / (k * real tokens),
    P_i = mean over real tokens of softmax(logits)_i."""
    num_experts = logits.shape[1]
    real = [t for t in range(logits.shape[0]) if valid is None or bool(valid[t])]
    f = [0.0] * num_experts
    p_sum = logits.new_zeros(num_experts)
    for t in real:
        p = torch.softmax(logits[t], dim=-1)
        for e in torch.topk(p, k).indices.tolist():
            f[e] += 1.0 / (k * len(real))
        p_sum = p_sum + p
    return num_experts * sum(f[e] * p_sum[e] / len(real) for e in range(num_experts))


def reference_z_loss(logits, valid=None):
    """mean over real tokens t of (log sum_e exp(logits[t, e]))^2."""
    real = [t for t in range(logits.shape[0]) if valid is None or bool(valid[t])]
    return sum(torch.log(torch.exp(logits[t]).sum()) ** 2 for t in real) / len(real)


def reference_dense_swiglu(x, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act=F.silu):
    """A dense Llama MLP with nn.Linear weights gate/up [F, D], down [D, F]: down(act(gate x) * up x)."""
    return (act(x @ gate.T) * (x @ up.T)) @ down.T
