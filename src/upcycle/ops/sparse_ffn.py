"""A SwiGLU FFN that computes only the neurons a token uses: the fast path behind compacted mask models.

Semantics (see `upcycle.ops.reference_ffn`): every token uses the shared neurons, plus the union of the routed
neurons of its K chosen experts, each neuron scaled by its mask value:

    y[t] = reference_masked_ffn(x, w_gate, w_up, w_down, union_mask(shared, experts, expert_idx))[t]

How it skips work. At construction the neurons are packed into blocks of contiguous rows:

    block 0      the shared neurons (shared[i] > 0)
    block 1 + e  expert e's routed neurons (experts[e, i] > 0); a neuron in two experts is stored in both blocks

so a block is a slice (a view, no copy) of the packed weights. Gate and up rows are interleaved ([N, 2, D]) so one
matmul yields both, and the down projection is stored transposed ([N, D]) so a block is also a row slice there.

- batch-1 decode: shared block + the chosen experts' blocks, each a matvec on a slice;
- batched prefill: shared block for all tokens, then tokens grouped by expert, one matmul per used expert;
- a token whose K > 1 chosen experts overlap cannot add blocks (a shared neuron would count twice), so it gathers
  the union of their neurons instead (slower, exact).

Legend: T tokens, D model dim, I intermediate neurons, E experts, K experts per token, N packed rows, n block rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SparseFFN(nn.Module):
    """Packed sparse SwiGLU FFN. Build with `from_dense`; `SparseFFN(...)` alone allocates an empty one to load into.

    `sizes` = [shared rows, rows of expert 0, ..., rows of expert E−1].
    """

    def __init__(self, hidden: int, intermediate: int, sizes: Sequence[int],
                 act: Callable[[torch.Tensor], torch.Tensor] = F.silu, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(sizes) < 1 or min(sizes) < 0:
            raise ValueError(f"sizes must be [shared, expert 0, ...] with non-negative entries, got {list(sizes)}")
        self.hidden, self.intermediate, self.act = hidden, intermediate, act
        self.sizes = [int(s) for s in sizes]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        rows = self.offsets[-1]
        self.register_buffer("w_gate_up", torch.zeros(rows, 2, hidden, dtype=dtype))
        self.register_buffer("w_down_t", torch.zeros(rows, hidden, dtype=dtype))
        self.register_buffer("value", torch.zeros(rows, dtype=dtype))
        self.register_buffer("neuron", torch.zeros(rows, dtype=torch.long))
        self.register_buffer("overlap", torch.zeros(self.num_experts, self.num_experts, dtype=torch.bool))

    @property
    def num_experts(self) -> int:
        return len(self.sizes) - 1

    @classmethod
    def from_dense(cls, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, shared: torch.Tensor,
                   experts: torch.Tensor | None = None,
                   act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> SparseFFN:
        """Pack a dense FFN (w_gate/w_up [I, D], w_down [D, I]) with shared values [I] and expert values [E, I].

        Shared and expert supports must be disjoint (a shared neuron is used by every token already). `experts=None`
        gives a static sparse FFN (the pruning and thresholding baselines).
        """
        intermediate, hidden = w_gate.shape
        experts = experts if experts is not None else shared.new_zeros(0, intermediate)
        if shared.shape != (intermediate,) or experts.shape[1:] != (intermediate,):
            raise ValueError(f"shared must be [{intermediate}] and experts [E, {intermediate}], "
                             f"got {tuple(shared.shape)} and {tuple(experts.shape)}")
        if ((shared != 0) & (experts != 0)).any():
            raise ValueError("a neuron cannot be both shared and routed: zero the experts' values where shared > 0")
        blocks = [torch.nonzero(shared).flatten()] + [torch.nonzero(row).flatten() for row in experts]
        op = cls(hidden, intermediate, [b.numel() for b in blocks], act, dtype=w_gate.dtype).to(w_gate.device)
        index = torch.cat(blocks)
        values = torch.cat([shared[blocks[0]]] + [experts[e, b] for e, b in enumerate(blocks[1:])])
        with torch.no_grad():
            op.w_gate_up.copy_(torch.stack([w_gate[index], w_up[index]], dim=1))  # [N, 2, D]
            op.w_down_t.copy_(w_down[:, index].t())
            op.value.copy_(values)
            op.neuron.copy_(index)
            support = (experts != 0).to(torch.float32)
            op.overlap.copy_(support @ support.t() > 0)
        return op

    # ---- one block -------------------------------------------------------------------------------------------------

    def _views(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per block: gate-up weights as a [D, 2n] view, down as an [n, D] view, values (None when all 1).

        Cached, because at batch-1 decode on a small model the slicing would cost as much as the matmuls; rebuilt
        when the buffers move or change (`.to()`, `load_state_dict`).
        """
        key = (self.w_gate_up.data_ptr(), self.w_down_t.data_ptr(), self.value.data_ptr(), self.value._version)
        if getattr(self, "_views_key", None) != key:
            views = []
            for start, end in zip(self.offsets[:-1], self.offsets[1:], strict=True):
                value = self.value[start:end]
                views.append((self.w_gate_up[start:end].reshape(2 * (end - start), self.hidden).t(),
                              self.w_down_t[start:end], None if bool((value == 1).all()) else value))
            self._views_cache, self._views_key = views, key
        return self._views_cache

    def _block(self, x: torch.Tensor, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output of the rows of `block` for tokens x [T, D], added to `out` [T, D] when given."""
        return self._rows(x, *self._views()[block], out=out)

    def _rows(self, x: torch.Tensor, w_gate_up_t: torch.Tensor, w_down_t: torch.Tensor, value: torch.Tensor | None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        n = w_down_t.shape[0]
        gate_up = (x @ w_gate_up_t).view(x.shape[0], n, 2)  # [T, 2n] -> [T, n, 2]: gate and up interleaved
        h = self.act(gate_up[..., 0]) * gate_up[..., 1]  # [T, n]
        if value is not None:
            h = h * value
        return h @ w_down_t if out is None else torch.addmm(out, h, w_down_t)  # [T, D]

    def _union(self, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """One token x [1, D] whose chosen experts overlap: gather the union of their neurons. -> [1, D]."""
        positions = torch.cat([torch.arange(self.offsets[1 + e], self.offsets[2 + e], device=x.device)
                               for e in experts])
        ids = self.neuron[positions]
        best = self.value.new_zeros(self.intermediate).scatter_reduce(0, ids, self.value[positions], "amax")
        first = torch.empty(self.intermediate, dtype=torch.long, device=x.device)
        first[ids] = positions  # any copy of a neuron has the same weights
        union = torch.unique(ids)
        rows = first[union]
        w_gate_up_t = self.w_gate_up[rows].reshape(2 * rows.numel(), self.hidden).t()
        return self._rows(x, w_gate_up_t, self.w_down_t[rows], best[union])

    # ---- forward ---------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D], expert_idx [T, K] (long; None or K = 0: shared neurons only) -> [T, D]."""
        y = self._block(x, 0) if self.sizes[0] else x.new_zeros(x.shape[0], self.hidden)
        if expert_idx is None or expert_idx.shape[1] == 0 or self.num_experts == 0:
            return y
        if x.shape[0] == 1:  # decode: a few matvecs on slices
            chosen = expert_idx[0].tolist()
            if self._disjoint(chosen):
                for e in chosen:
                    if self.sizes[1 + e]:
                        y = self._block(x, 1 + e, out=y)
                return y
            return y + self._union(x, chosen)
        return self._grouped(x, expert_idx, y)

    def _disjoint(self, chosen: list[int]) -> bool:
        if len(chosen) == 1:
            return True
        sub = self.overlap[chosen][:, chosen]  # [K, K]; the diagonal is "overlaps itself"
        return len(set(chosen)) == len(chosen) and int(sub.sum()) == int(sub.diagonal().sum())

    def _grouped(self, x: torch.Tensor, expert_idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batched tokens: group (token, expert) pairs by expert; overlapping tokens take the gathered path."""
        tokens, k = expert_idx.shape
        clean = torch.ones(tokens, dtype=torch.bool, device=x.device)
        if k > 1:
            pair = self.overlap[expert_idx[:, :, None], expert_idx[:, None, :]]  # [T, K, K]
            off_diagonal = ~torch.eye(k, dtype=torch.bool, device=x.device)
            clean = ~(pair & off_diagonal).any(dim=(1, 2))
        token = torch.arange(tokens, device=x.device)[clean].repeat_interleave(k)  # [P] pairs, token-major
        expert = expert_idx[clean].reshape(-1)  # [P]
        order = torch.argsort(expert, stable=True)
        token, counts = token[order], torch.bincount(expert, minlength=self.num_experts).tolist()
        start = 0
        for e, count in enumerate(counts):
            if count and self.sizes[1 + e]:
                rows = token[start:start + count]
                y = y.index_add(0, rows, self._block(x[rows], 1 + e))
            start += count
        for t in torch.nonzero(~clean).flatten().tolist():
            y[t] += self._union(x[t:t + 1], expert_idx[t].tolist())[0]
        return y

    def forward_mixture(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, E] -> [T, D] with mask shared + weights @ experts (soft routing).

        The FFN output is linear in the mask, so this is the shared block plus each expert's block scaled by its
        weight; every expert with a non-zero weight runs on every token (no skipping across experts).
        """
        y = self._block(x, 0) if self.sizes[0] else x.new_zeros(x.shape[0], self.hidden)
        for e in range(self.num_experts):
            if self.sizes[1 + e]:
                y = y + weights[:, e:e + 1] * self._block(x, 1 + e)  # [T, 1] * [T, D]
        return y

    def active_neurons(self, expert_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Neurons computed for each token under `forward`: shared + |union of chosen experts|. -> [T] long."""
        if expert_idx is None or expert_idx.shape[1] == 0 or self.num_experts == 0:
            tokens = 1 if expert_idx is None else expert_idx.shape[0]
            return torch.full((tokens,), self.sizes[0], dtype=torch.long)
        support = torch.zeros(self.num_experts, self.intermediate, dtype=torch.bool, device=self.neuron.device)
        for e in range(self.num_experts):
            support[e, self.neuron[self.offsets[1 + e]:self.offsets[2 + e]]] = True
        return self.sizes[0] + support[expert_idx].any(dim=1).sum(dim=1)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, intermediate={self.intermediate}, shared={self.sizes[0]}, "
                f"experts={self.sizes[1:]}")


def input_sparse_ffn(x: torch.Tensor, w_gate_up_t: torch.Tensor, w_down_t: torch.Tensor, tau_in: float,
                     tau_mid: float, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> torch.Tensor:
    """One token's SwiGLU FFN reading only the weight rows of its large activations (TEAL-style decode).

    x [D]; w_gate_up_t [D, 2I] (gate columns, then up columns); w_down_t [I, D]. Semantics (the plain reference is
    the dense FFN with the small entries zeroed, `upcycle.masks.baselines.teal.ThresholdFFN` on batched input):

        x' = x where |x| > tau_in else 0;   h = act(x' W_gate) * (x' W_up);   h' = h where |h| > tau_mid else 0
        y  = h' W_down

    Only the rows of w_gate_up_t for kept inputs and the rows of w_down_t for kept activations are read (gathered,
    then one matvec each), so the work scales with the kept fractions. -> [D].
    """
    keep = torch.nonzero(x.abs() > tau_in).flatten()  # [k]
    gate_up = x[keep] @ w_gate_up_t[keep]  # [k] @ [k, 2I] -> [2I]
    gate, up = gate_up.view(2, -1)
    h = act(gate) * up  # [I]
    active = torch.nonzero(h.abs() > tau_mid).flatten()  # [a]
    return h[active] @ w_down_t[active]  # [a] @ [a, D] -> [D]
