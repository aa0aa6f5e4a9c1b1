"""Batched multi-adapter LoRA: every row of a batch may use a different adapter (Punica BGMV / S-LoRA style).

The adapters of the rows being served sit in fixed-capacity stacked slot buffers, A as [S, R, I] and B as [S, O, R];
a forward gathers each row's A and B by slot index and runs two batched matmuls. The plain loop these functions must
equal is `upcycle.ops.reference_lora.reference_lora`.

Legend used throughout: N rows, T tokens per row, I in features, O out features, S slots, R max rank.

`attach_multi_lora` does the model surgery: it swaps the targeted `nn.Linear` layers of a Hugging Face model for
`MultiLoRALinear` wrappers that share one `LoRABatch` (the per-step slot selection), so a forward of the unchanged
HF model serves a mixed batch once the selection is set.

When every row of a forward uses the same slot, a wrapper can instead run one linear with a merged weight
W + scale * B A kept in a spare buffer (rebuilt only when the slot changes): a lone request then costs what the base
model costs. That buffer is one extra copy of each wrapped weight, so it is opt-in (`merge_single_slot`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from upcycle.models.surgery import find_linears, replace_module


def batched_lora(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 idx: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Add `scale[idx[n]] * (x[n] A[idx[n]]^T) B[idx[n]]^T` to `base_out[n]` in place (rows with idx -1 get nothing).

    Shapes as in `reference_lora`: x [N, T, I] (prefill) or [N, I] (decode), base_out likewise with O, lora_a
    [S, R, I], lora_b [S, O, R], idx [N], scale [S] or None. Returns `base_out`.
    """
    keep = idx >= 0
    safe_idx = torch.where(keep, idx, torch.zeros_like(idx))
    row_scale = keep.to(lora_a.dtype)  # [N]; 0 silences rows without an adapter
    if scale is not None:
        row_scale = row_scale * scale.to(lora_a.dtype).index_select(0, safe_idx)
    return lora_bgmv(x, base_out, lora_a, lora_b, safe_idx, row_scale)


def lora_bgmv(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              slots: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The hot path of `batched_lora`: every slot index is valid and scaling is folded into B or given per row.

    x [N, T, I] or [N, I]; base_out [N, T, O] or [N, O], updated in place and returned; slots [N] (no -1);
    row_scale [N] or None.
    """
    a, bt = gather_lora(lora_a, lora_b, slots)
    return apply_gathered_lora(x, base_out, a, bt, row_scale)


def gather_lora(lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's A [N, R, I] and B^T [N, R, O], gathered per row (not per token: routing is per sequence).

    B^T is a contiguous copy when B is stored R-major as MultiLoRALinear does, which makes both this gather and the
    batched matmul after it 1.5-2x faster on CPU than gathering [N, O, R] and transposing.
    """
    return lora_a.index_select(0, slots), lora_b.transpose(1, 2).index_select(0, slots)


def apply_gathered_lora(x: torch.Tensor, base_out: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                        row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """base_out[n] += (x[n] a[n]^T) bt[n] (times row_scale[n]), in place; the second half of `lora_bgmv`."""
    x3 = x.unsqueeze(1) if x.dim() == 2 else x  # [N, T, I]
    out3 = base_out.unsqueeze(1) if base_out.dim() == 2 else base_out  # [N, T, O], a view of base_out
    shrunk = torch.bmm(x3.to(a.dtype), a.transpose(1, 2))  # [N, T, R]
    if row_scale is not None:
        shrunk = shrunk * row_scale.to(shrunk.dtype)[:, None, None]
    if out3.dtype == bt.dtype:
        out3.baddbmm_(shrunk, bt)  # [N, T, O] += [N, T, R] @ [N, R, O]
    else:
        out3.add_(torch.bmm(shrunk, bt).to(out3.dtype))
    return base_out


def lora_single_slot(x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     slot: int) -> torch.Tensor:
    """`lora_bgmv` when every row uses the same slot: no gather, two plain matmuls. Updates `base_out` in place."""
    x2 = x.reshape(-1, x.shape[-1])  # [N*T, I]
    out2 = base_out.view(-1, base_out.shape[-1])  # [N*T, O]
    shrunk = x2.to(lora_a.dtype) @ lora_a[slot].T  # [N*T, R]
    if out2.dtype == lora_b.dtype:
        out2.addmm_(shrunk, lora_b[slot].T)
    else:
        out2.add_((shrunk @ lora_b[slot].T).to(out2.dtype))
    return base_out


@dataclass
class LoRABatch:
    """Which slot each row of the next forward uses; shared by every `MultiLoRALinear` of one model.

    The slot index buffer is allocated once and filled in place each step, as vLLM's punica wrapper does. `set` also
    picks the path the wrapped layers take: no adapter -> base only; one slot for all rows -> `lora_single_slot` (or
    merged weights); otherwise -> `lora_bgmv`.

    (Multiplying against all slots at once with a 0/1 row mask, to skip the gathers, was tried and measured 3-4x
    slower than `lora_bgmv` for the tiny benchmark model on CPU: those matmuls are compute-bound, not dispatch-bound.)
    """

    max_rows: int
    """Largest batch (rows) a forward may have."""
    zero_slot: int
    """Index of the all-zero slot that rows without an adapter point to (so the hot path needs no mask)."""
    device: torch.device | str = "cpu"
    """Where the slot buffers live."""
    merge_single_slot: bool = False
    """Serve single-slot forwards through a merged weight (one extra copy of every wrapped weight)."""
    _buffer: torch.Tensor = field(init=False, repr=False)
    slots: torch.Tensor | None = field(init=False, default=None)
    """[N] view of the index buffer for the current forward, or None when no row uses an adapter."""
    single_slot: int | None = field(init=False, default=None)
    """The slot every row uses, when they all use the same one (enables the gather-free path)."""
    version: int = field(init=False, default=0)
    """Bumped whenever the row -> slot map or a slot's contents change: layers reuse their gathered A/B until then
    (between joins and departures a decode batch keeps its composition for many steps)."""
    _mapped: tuple[int, ...] = field(init=False, default=(), repr=False)

    def __post_init__(self) -> None:
        self._buffer = torch.full((self.max_rows,), self.zero_slot, dtype=torch.long, device=self.device)

    def set(self, idx: Sequence[int]) -> None:
        """Select slot `idx[n]` for row n (-1: no adapter) for the forwards until the next `set` or `clear`."""
        n = len(idx)
        if n > self.max_rows:
            raise ValueError(f"batch of {n} rows exceeds LoRABatch.max_rows={self.max_rows}")
        mapped = [i if i >= 0 else self.zero_slot for i in idx]
        distinct = set(mapped)
        if distinct <= {self.zero_slot}:
            self.clear()
            return
        self.single_slot = mapped[0] if len(distinct) == 1 else None
        view = self._buffer[:n]
        if tuple(mapped) != self._mapped:
            view.copy_(torch.tensor(mapped, dtype=torch.long), non_blocking=True)
            self._mapped = tuple(mapped)
            self.version += 1
        self.slots = view

    def clear(self) -> None:
        """No adapters: wrapped layers return the base output untouched."""
        self.slots, self.single_slot = None, None


class MultiLoRALinear(nn.Module):
    """An `nn.Linear` plus S stacked LoRA slots; each row of the input uses the slot its `LoRABatch` names.

    The slot buffers are allocated once at full capacity and filled in place; slot S (the last) stays zero and
    serves rows without an adapter. B is stored already multiplied by the adapter's scaling (alpha / r), so the hot
    path skips one multiply, and rank-major in memory (see `gather_lora`). The rows' gathered A and B^T are kept
    until `LoRABatch.version` changes, so steady decode steps skip the gathers.
    """

    def __init__(self, base_layer: nn.Linear, n_slots: int, max_rank: int, batch: LoRABatch) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.max_rank = max_rank
        weight = base_layer.weight
        # non-persistent buffers: the model's state_dict stays the base model's
        self.register_buffer("lora_a", weight.new_zeros(n_slots + 1, max_rank, base_layer.in_features),
                             persistent=False)  # [S+1, R, I]
        # [S+1, O, R] as the op expects, stored R-major (a transposed view of [S+1, R, O]) for the gather's sake
        self.register_buffer("lora_b", weight.new_zeros(n_slots + 1, max_rank, base_layer.out_features).transpose(1, 2),
                             persistent=False)
        self._batch = batch  # a plain attribute, not a submodule: shared by every wrapped layer
        self._plain_linear = type(base_layer) is nn.Linear  # subclasses may override forward: call those
        # W + B A of one slot, for single-slot forwards (None when that path is off)
        self.register_buffer("merged_weight", weight.detach().clone() if batch.merge_single_slot else None,
                             persistent=False)  # [O, I]
        self._merged_slot = -1  # the slot `_merged` holds now (-1: none; stale after that slot is rewritten)
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # this layer's A, B^T for the current rows
        self._gathered_version = -1  # LoRABatch.version they were gathered at

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        if batch.slots is None:
            return self._base(x)
        if batch.single_slot is not None:
            if self.merged_weight is not None:
                return nn.functional.linear(x, self._merge(batch.single_slot), self.base_layer.bias)
            return lora_single_slot(x, self._base(x), self.lora_a, self.lora_b, batch.single_slot)
        if self._gathered_version != batch.version:
            self._gathered = gather_lora(self.lora_a, self.lora_b, batch.slots)
            self._gathered_version = batch.version
        return apply_gathered_lora(x, self._base(x), *self._gathered)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        # A plain nn.Linear is called functionally: 28 wrapped layers x a Module call each is measurable per step.
        if self._plain_linear:
            return nn.functional.linear(x, self.base_layer.weight, self.base_layer.bias)
        return self.base_layer(x)

    def _merge(self, slot: int) -> torch.Tensor:
        """W + B A for `slot` (B already scaled), rebuilt only when the slot differs from last time."""
        if self._merged_slot != slot:  # checked outside no_grad: entering it on every call costs ~3 us x layers
            with torch.no_grad():
                torch.addmm(self.base_layer.weight, self.lora_b[slot], self.lora_a[slot], out=self.merged_weight)
            self._merged_slot = slot
        return self.merged_weight

    @torch.no_grad()
    def set_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Copy one adapter's A [r, I] and B [O, r] into `slot` (r <= max_rank; the rest of the slot is zeroed)."""
        rank = lora_a.shape[0]
        self._batch.version += 1  # every layer's gathered copies may hold this slot
        if slot == self._merged_slot:
            self._merged_slot = -1
        if rank > self.max_rank:
            raise ValueError(f"adapter rank {rank} exceeds the slot capacity max_rank={self.max_rank}")
        self.lora_a[slot, :rank].copy_(lora_a, non_blocking=True)  # copy_ also converts the dtype
        if scaling == 1.0:
            self.lora_b[slot, :, :rank].copy_(lora_b, non_blocking=True)
        else:  # scale while copying: one op instead of two
            torch.mul(lora_b.to(self.lora_b.dtype), scaling, out=self.lora_b[slot, :, :rank])
        if rank < self.max_rank:
            self.lora_a[slot, rank:].zero_()
            self.lora_b[slot, :, rank:].zero_()

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero `slot`, so a row pointing at it gets the base output."""
        self._batch.version += 1
        if slot == self._merged_slot:
            self._merged_slot = -1
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()


@dataclass
class MultiLoRA:
    """Handle on a model after `attach_multi_lora`: its wrapped layers, their shared `LoRABatch`, and slot filling."""

    layers: dict[str, MultiLoRALinear]
    """Wrapped layers by full module name (e.g. `model.layers.0.self_attn.q_proj`)."""
    batch: LoRABatch
    """The slot selection every wrapped layer reads."""
    n_slots: int
    """Adapter slots (the zero slot excluded)."""
    max_rank: int
    """Largest adapter rank a slot holds."""

    @contextlib.contextmanager
    def select(self, idx: Sequence[int]) -> Iterator[None]:
        """Run the forwards inside the block with row n using slot `idx[n]` (-1: base model only)."""
        self.batch.set(idx)
        try:
            yield
        finally:
            self.batch.clear()

    def load_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Fill `slot` from {module name: (A [r, I], B [O, r], scaling)}; wrapped layers not named are zeroed."""
        self._check_slot(slot)
        unknown = set(weights) - set(self.layers)
        if unknown:
            raise KeyError(f"adapter targets modules that are not wrapped: {sorted(unknown)[:3]}")
        for name, layer in self.layers.items():
            if name in weights:
                layer.set_slot(slot, *weights[name])
            else:
                layer.clear_slot(slot)

    def clear_slot(self, slot: int) -> None:
        """Zero `slot` in every wrapped layer."""
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def slot_nbytes(self) -> int:
        """Bytes one slot takes across all wrapped layers."""
        return sum((layer.lora_a[0].numel() + layer.lora_b[0].numel()) * layer.lora_a.element_size()
                   for layer in self.layers.values())

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")


def attach_multi_lora(model: nn.Module, targets: str | Iterable[str], n_slots: int, max_rank: int,
                      max_rows: int = 256, merge_single_slot: bool = False) -> MultiLoRA:
    """Swap every `nn.Linear` of `model` whose name matches `targets` (PEFT's `target_modules` rule) for a
    `MultiLoRALinear` with `n_slots` slots of rank `max_rank`, in place; returns the handle that fills the slots.

    `merge_single_slot` enables the merged-weight path for forwards where all rows share one slot."""
    weight = next(model.parameters())
    batch = LoRABatch(max_rows=max_rows, zero_slot=n_slots, device=weight.device,
                      merge_single_slot=merge_single_slot)
    chosen = find_linears(model, targets)
    if not chosen:
        raise ValueError(f"no nn.Linear in the model matches target modules {targets!r}")
    layers: dict[str, MultiLoRALinear] = {}
    for name, module in chosen:
        layers[name] = MultiLoRALinear(module, n_slots, max_rank, batch)
        replace_module(model, name, layers[name])
    return MultiLoRA(layers=layers, batch=batch, n_slots=n_slots, max_rank=max_rank)
