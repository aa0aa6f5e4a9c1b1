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


def document_nll(model, documents: Sequence[Sequence[int]], pad_id: int, block_size: int = 256,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, predicted tokens) of each document, every document cut into blocks of its own.

    The same numbers as `token_nll` on `pack([doc], block_size)` one document at a time, but blocks of different
    documents share a forward (see `document_log_probs`).
    """
    log_probs = document_log_probs(model, documents, pad_id, block_size, batch_size)
    return (np.array([-lp.sum(dtype=np.float64) for lp in log_probs], dtype=np.float64),
            np.array([len(lp) for lp in log_probs], dtype=np.int64))


@torch.no_grad()
def document_log_probs(model, documents: Sequence[Sequence[int]], pad_id: int, block_size: int = 256,
                       batch_size: int = 16) -> list[np.ndarray]:
    """Log-probability of every predicted token of each document (float32 [predicted tokens]), in text order.

    Each document is cut into blocks of `block_size` tokens; the first token of a block is not predicted. Blocks of
    different documents share a forward: they are sorted by length and right-padded only to the longest block of
    their batch. Right padding cannot change a real token's logits in a causal LM whose tokens interact only through
    attention, so this is not for capacity-routed MoE layers (pad tokens would take expert capacity).
    """
    device = next(model.parameters()).device
    blocks = [(doc, start, seq[start:start + block_size]) for doc, seq in enumerate(documents)
              for start in range(0, len(seq), block_size)]
    blocks = sorted((b for b in blocks if len(b[2]) > 1), key=lambda b: len(b[2]))  # one token predicts nothing
    # Every block but a document's last is full, so block j's predictions start at j * (block_size - 1).
    out = [np.zeros(sum(max(len(seq[s:s + block_size]) - 1, 0) for s in range(0, len(seq), block_size)), np.float32)
           for seq in documents]
    for first in range(0, len(blocks), batch_size):
        batch = blocks[first:first + batch_size]
        width = len(batch[-1][2])
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, (_, _, seq) in enumerate(batch):
            inputs[row, :len(seq)] = labels[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        logits = model(input_ids=inputs.to(device)).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        per_token = -F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        per_token = per_token.cpu().numpy()  # [B, width - 1]
        for row, (doc, start, seq) in enumerate(batch):
            offset = start // block_size * (block_size - 1)
            out[doc][offset:offset + len(seq) - 1] = per_token[row, :len(seq) - 1]
    return out


def mix_log_probs(log_probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Per-token log-probability of a mixture: log sum_i w_i p_i(x_t) from each member's log p_i [k][T], in float64.

    A zero weight drops its member (its log-probabilities may be anything, -inf included).
    """
    from scipy.special import logsumexp

    stacked = np.stack([np.asarray(lp, np.float64) for lp in log_probs])  # [k, T]
    return logsumexp(stacked, axis=0, b=np.asarray(weights, np.float64)[:, None])
