"""Plain-loop reference for multi-adapter LoRA; the semantics the fast op in `batched_lora.py` must match.

Slow on purpose: one Python iteration per row and per token, float64-friendly, no gathers and no tricks.
"""

from __future__ import annotations

import torch


def reference_lora(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   idx: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Add each row's LoRA delta to `base_out`, one row and one token at a time.

    Legend: N rows, T tokens per row (absent for decode-shaped inputs), I in features, O out features,
    S adapter slots, R max rank.

        x:        [N, T, I] or [N, I]
        base_out: [N, T, O] or [N, O]   (the base layer's output for x)
        lora_a:   [S, R, I]             (slot s's A, rank padded with zero rows)
        lora_b:   [S, O, R]             (slot s's B, rank padded with zero columns)
        idx:      [N] long              (slot of each row; -1 means the row uses no adapter)
        scale:    [S] or None           (None means 1, i.e. B already carries the scaling)

    Semantics as a loop:

        for i in range(N):
            for t in range(T):
                s = idx[i]
                y[i, t] = base_out[i, t] + (scale[s] * (x[i, t] @ lora_a[s].T) @ lora_b[s].T if s >= 0 else 0)

    Returns a new tensor shaped like `base_out`.
    """
    decode = x.dim() == 2
    if decode:  # [N, I] -> [N, 1, I]: one token per row
        x, base_out = x.unsqueeze(1), base_out.unsqueeze(1)
    out = base_out.clone()
    for i in range(x.shape[0]):
        s = int(idx[i])
        if s < 0:
            continue
        s_scale = 1.0 if scale is None else scale[s]
        for t in range(x.shape[1]):
            shrunk = x[i, t].to(lora_a.dtype) @ lora_a[s].T  # [R]
            out[i, t] += (s_scale * (shrunk @ lora_b[s].T)).to(out.dtype)  # [O]
    return out.squeeze(1) if decode else out
