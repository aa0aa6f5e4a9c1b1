"""Token-level negative log-likelihood and perplexity of a causal LM on packed blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from upcycle.data.packing import IGNORE_INDEX


@torch.no_grad()
def token_nll(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> tuple[float, int]:
    """Sum of next-token NLL (nats) and number of predicted tokens over blocks [N, L]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = y[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(nll)
        count += int((target != IGNORE_INDEX).sum())
    return total, count


def perplexity(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean token NLL) over blocks [N, L]."""
    total, count = token_nll(model, inputs, labels, batch_size)
    return math.exp(total / max(count, 1))
