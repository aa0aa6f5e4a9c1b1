"""Held-out loss of a causal LM, the one home for it: token NLL, mean loss and perplexity on packed blocks, and
per-document NLL scored in batches."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def mean_loss(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
    """Token-weighted mean next-token loss (nats) over blocks [N, L]; the model's train / eval mode is left as is."""
    total, count = token_nll(model, inputs, labels, batch_size)
    return total / max(count, 1)


def perplexity(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean token NLL) over blocks [N, L]."""
    return math.exp(mean_loss(model, inputs, labels, batch_size))


@torch.no_grad()
def document_nll(model, documents: Sequence[Sequence[int]], pad_id: int, block_size: int = 256,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, predicted tokens) of each document, every document cut into blocks of its own.

    The same numbers as `token_nll` on `pack([doc], block_size)` one document at a time, but blocks of different
    documents share a forward: they are sorted by length and right-padded only to the longest block of their batch.
    Right padding cannot change a real token's logits in a causal LM whose tokens interact only through attention,
    so this is not for capacity-routed MoE layers (pad tokens would take expert capacity).
    """
    device = next(model.parameters()).device
    blocks = [(doc, seq[start:start + block_size]) for doc, seq in enumerate(documents)
              for start in range(0, len(seq), block_size)]
    blocks = sorted((b for b in blocks if len(b[1]) > 1), key=lambda b: len(b[1]))  # one token predicts nothing
    nll, count = np.zeros(len(documents)), np.zeros(len(documents), dtype=np.int64)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        width = len(batch[-1][1])
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, seq) in enumerate(batch):
            inputs[row, :len(seq)] = labels[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        logits = model(input_ids=inputs.to(device)).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        rows = np.array([doc for doc, _ in batch])
        np.add.at(nll, rows, per_token.sum(1).double().cpu().numpy())
        np.add.at(count, rows, (target != IGNORE_INDEX).sum(1).cpu().numpy())
    return nll, count
