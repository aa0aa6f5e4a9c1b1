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
    shrunk = torch.bmm(x3 if x3.dtype == a.dtype else x3.to(a.dtype), a.transpose(1, 2))  # [N, T, R]
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
    merge_after: int = 16
    """With `merge_single_slot`: the break-even run length, in forwards. Rewriting every wrapped weight costs about
    as much as this many unmerged forwards' two small matmuls per layer; `attach_multi_lora` sets it from the
    model's shapes (`merge_break_even`). When the caller says how many forwards the selection will keep serving
    (`set(..., ahead=)`), a slot merges at once if that run reaches this length and never otherwise; when it does
    not, the slot merges once it has served this many forwards in a row (ski rental: never more than about twice
    the better of 'always merge' and 'never merge')."""
    _buffer: torch.Tensor = field(init=False, repr=False)
    slots: torch.Tensor | None = field(init=False, default=None)
    """[N] view of the index buffer for the current forward, or None when no row uses an adapter."""
    single_slot: int | None = field(init=False, default=None)
    """The slot every row uses, when they all use the same one (enables the gather-free path)."""
    single_streak: int = field(init=False, default=0)
    """Forwards in a row, this one included, that `single_slot` has served alone with unchanged contents."""
    merge_due: bool = field(init=False, default=False)
    """Single-slot forwards should use (and if need be build) the merged weight: see `merge_after`."""
    version: int = field(init=False, default=0)
    """Bumped whenever the row -> slot map or a slot's contents change: layers reuse their gathered A/B until then
    (between joins and departures a decode batch keeps its composition for many steps)."""
    rows: tuple[int, ...] = field(init=False, default=())
    """The slot of each row of the current (or last) multi-slot forward, zero slot for rows without an adapter."""
    first: int = field(init=False, default=0)
    """Batch row where `rows` begin: a forward may run a contiguous part of the batch (the engine runs prefilling
    rows apart from decoding ones), and each batch row keeps its gathered A and B^T in its own place."""
    generations: list[int] = field(init=False, repr=False)
    """Per slot, how many times its contents were rewritten (a gathered copy of an older generation is stale)."""
    _last_single: int | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self._buffer = torch.full((self.max_rows,), self.zero_slot, dtype=torch.long, device=self.device)
        self.generations = [0] * (self.zero_slot + 1)

    def set(self, idx: Sequence[int], ahead: int | None = None, first: int = 0) -> None:
        """Select slot `idx[n]` for batch row first + n (-1: no adapter) for the forwards until the next `set` or
        `clear`.

        `ahead`: how many forwards after this one the caller expects to make with the same selection (e.g. a lone
        request's remaining tokens), or None when it cannot tell; it decides when a single slot merges."""
        n = len(idx)
        if first < 0 or first + n > self.max_rows:
            raise ValueError(f"batch rows {first}..{first + n - 1} exceed LoRABatch.max_rows={self.max_rows}")
        mapped = [i if i >= 0 else self.zero_slot for i in idx]
        distinct = set(mapped)
        if distinct <= {self.zero_slot}:
            self.clear()
            return
        single = mapped[0] if len(distinct) == 1 else None
        self.single_streak = self.single_streak + 1 if single is not None and single == self._last_single else 1
        self.single_slot = self._last_single = single
        if single is None:
            self.merge_due = False
        elif ahead is None:
            self.merge_due = self.single_streak > self.merge_after
        else:  # the run's length is known: a merge pays for itself if the forwards left reach break-even
            self.merge_due = ahead + 1 >= self.merge_after
        view = self._buffer[first: first + n]
        if tuple(mapped) != self.rows or first != self.first:
            view.copy_(torch.tensor(mapped, dtype=torch.long), non_blocking=True)
            self.rows, self.first = tuple(mapped), first
            self.version += 1
        self.slots = view

    def clear(self) -> None:
        """No adapters: wrapped layers return the base output untouched."""
        self.slots, self.single_slot = None, None

    def rewrote(self, slot: int) -> None:
        """`slot`'s contents changed: gathered copies are stale, and a streak on it starts again."""
        self.version += 1
        self.generations[slot] += 1
        if slot == self._last_single:
            self.single_streak = 0


class SlotStack:
    """The slot buffers of every wrapped layer of one (in, out) shape, stacked: A [G, S+1, R, I] and B^T
    [G, S+1, R, O] for the G layers of that shape (the four attention and three MLP projections of a Llama make
    four stacks).

    Stacking is what makes slot traffic cheap: filling a slot is one copy per stack instead of two per layer (420
    for SmolLM2's 210 wrapped layers, whose fixed cost per copy dominated the 2 ms swap target).

    The rows' gathered A and B^T live in buffers that persist across steps, and a change of the batch copies only
    the rows whose (slot, generation) differs from what the buffer holds: a request joining or leaving a batch of 16
    (the engine moves the last row into a freed one) rewrites one or two rows, not all 16 adapters' weights (150 MB
    at SmolLM2's width, which measured ~12 ms a step when every row was gathered again).
    """

    def __init__(self, count: int, n_slots: int, max_rank: int, in_features: int, out_features: int,
                 like: torch.Tensor) -> None:
        self.a = like.new_zeros(count, n_slots + 1, max_rank, in_features)  # [G, S+1, R, I]
        self.bt = like.new_zeros(count, n_slots + 1, max_rank, out_features)  # [G, S+1, R, O], B stored R-major
        self._rows_a = self.a[:, :0].clone()  # [G, capacity, R, I]: row n's A, grown on demand
        self._rows_bt = self.bt[:, :0].clone()  # [G, capacity, R, O]
        self._held: list[tuple[int, int] | None] = []  # per buffer row: (slot, generation) it holds
        self._version = -1

    def gathered(self, batch: LoRABatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's per-row A [G, N, R, I] and B^T [G, N, R, O] for `batch.rows` (batch rows `batch.first`
        on); rows already holding their slot's current generation are not copied again."""
        rows, first = batch.rows, batch.first
        if self._version != batch.version:
            if first + len(rows) > len(self._held):
                self._grow(first + len(rows), batch.max_rows)
            for n, slot in enumerate(rows, start=first):
                if self._held[n] != (slot, batch.generations[slot]):
                    # one copy per row, straight from the slot: an index_select + index_copy_ pair went through a
                    # temporary as large as the rows (150 MB for 16 SmolLM2 adapters), 4x slower for a full batch
                    self._rows_a[:, n].copy_(self.a[:, slot])
                    self._rows_bt[:, n].copy_(self.bt[:, slot])
                    self._held[n] = (slot, batch.generations[slot])
            self._version = batch.version
        return self._rows_a[:, first: first + len(rows)], self._rows_bt[:, first: first + len(rows)]

    def forget_rows(self) -> None:
        """Treat every gathered row as stale, so the next `gathered` copies them all (for timing a full gather)."""
        self._held = [None] * len(self._held)

    def _grow(self, rows: int, max_rows: int) -> None:
        """Room for at least `rows` rows (doubling up to `max_rows`, so a growing batch reallocates a few times)."""
        capacity = max(rows, min(2 * len(self._held), max_rows))
        grown_a = self.a.new_zeros(self.a.shape[0], capacity, *self.a.shape[2:])
        grown_bt = self.bt.new_zeros(self.bt.shape[0], capacity, *self.bt.shape[2:])
        grown_a[:, : len(self._held)] = self._rows_a
        grown_bt[:, : len(self._held)] = self._rows_bt
        self._rows_a, self._rows_bt = grown_a, grown_bt
        self._held += [None] * (capacity - len(self._held))


class MultiLoRALinear(nn.Module):
    """An `nn.Linear` plus S LoRA slots (views of its `SlotStack`); each row of the input uses the slot its
    `LoRABatch` names.

    Slot S (the last) stays zero and serves rows without an adapter. B is stored already multiplied by the
    adapter's scaling (alpha / r), so the hot path skips one multiply, and rank-major in memory (see `gather_lora`).
    The rows' gathered A and B^T are kept until `LoRABatch.version` changes, so steady decode steps skip the gathers.
    The slot buffers are views into the stack: move the model to its device before `attach_multi_lora`.
    """

    def __init__(self, base_layer: nn.Linear, stack: SlotStack, position: int, batch: LoRABatch) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.max_rank = stack.a.shape[2]
        self._stack, self._position = stack, position  # plain attributes: the stack is shared by a layer group
        # non-persistent buffers: the model's state_dict stays the base model's
        self.register_buffer("lora_a", stack.a[position], persistent=False)  # [S+1, R, I]
        # [S+1, O, R] as the op expects, a transposed view of the stored [S+1, R, O]
        self.register_buffer("lora_b", stack.bt[position].transpose(1, 2), persistent=False)
        self._batch = batch  # a plain attribute, not a submodule: shared by every wrapped layer
        self._plain_linear = type(base_layer) is nn.Linear  # subclasses may override forward: call those
        # W + B A of one slot, for single-slot forwards (None when that path is off)
        self.register_buffer("merged_weight", base_layer.weight.detach().clone() if batch.merge_single_slot else None,
                             persistent=False)  # [O, I]
        self._merged_slot = -1  # the slot `merged_weight` holds now (-1: none; stale after that slot is rewritten)
        # this layer's views of the rows' gathered A [N, R, I] and B^T [N, R, O], valid while the batch's version
        # holds: slicing them anew costs a few view ops per layer and step (routed minus base, 16-row SmolLM2 decode
        # step: 23.2 ms with these cached against 25.3 ms without, one run each)
        self._rows_version, self._rows_a, self._rows_bt = -1, None, None

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
        slot = batch.single_slot
        if slot is not None:
            merged = self.merged_weight is not None
            if merged and (slot == self._merged_slot or batch.merge_due):
                return nn.functional.linear(x, self._merge(slot), self.base_layer.bias)
            return lora_single_slot(x, self._base(x), self.lora_a, self.lora_b, slot)
        if self._rows_version != batch.version:
            a, bt = self._stack.gathered(batch)
            self._rows_a, self._rows_bt = a[self._position], bt[self._position]
            self._rows_version = batch.version
        return apply_gathered_lora(x, self._base(x), self._rows_a, self._rows_bt)

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

    def forget_merge(self, slot: int) -> None:
        """`slot` was rewritten: a merged weight built from it is stale."""
        if slot == self._merged_slot:
            self._merged_slot = -1


@dataclass
class PackedAdapter:
    """One adapter laid out as the slot stacks hold it: per stack, A [G, R, I] and B^T [G, R, O] with B scaled and
    rank padded with zeros (layers the adapter does not target are zero). Filling a slot from it is one copy per
    stack; `MultiLoRA.pack` makes it off the serving thread."""

    a: list[torch.Tensor]
    bt: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a, *self.bt))

    def pin_memory(self) -> PackedAdapter:
        """Page-locked copies, so copies into accelerator slots can run asynchronously."""
        return PackedAdapter([t.pin_memory() for t in self.a], [t.pin_memory() for t in self.bt])


def _pack_full(chosen: dict[int, tuple[torch.Tensor, torch.Tensor, float]], a: torch.Tensor, bt: torch.Tensor
               ) -> None:
    """Write A [G, R, I] and scaled B^T [G, R, O] of an adapter that fills every layer of a stack at full rank: two
    stacks and one multiply, where the per-layer path issues three small ops per layer (420 for SmolLM2's 210
    layers, most of a 9.8 MB adapter's pack time)."""
    order = [chosen[g] for g in range(len(a))]
    same = all(lora_a.dtype == a.dtype and lora_b.dtype == bt.dtype for lora_a, lora_b, _ in order)
    if same:  # straight into the buffers
        torch.stack([lora_a for lora_a, _, _ in order], out=a)
        torch.stack([lora_b.T for _, lora_b, _ in order], out=bt)
    else:
        a.copy_(torch.stack([lora_a for lora_a, _, _ in order]))
        bt.copy_(torch.stack([lora_b.T for _, lora_b, _ in order]))
    # the scalings stay float32 (bf16 slots too), as the per-layer path's Python-float multiply keeps them
    scalings = torch.tensor([scaling for _, _, scaling in order], dtype=torch.promote_types(bt.dtype, torch.float32))
    bt.mul_(scalings.view(-1, 1, 1))


def _pack_padded(chosen: dict[int, tuple[torch.Tensor, torch.Tensor, float]], a: torch.Tensor, bt: torch.Tensor
                 ) -> None:
    """Write A [G, R, I] and scaled B^T [G, R, O] layer by layer: ranks below max_rank padded with zeros, layers
    the adapter does not target left zero."""
    a.zero_()
    bt.zero_()
    for g, (lora_a, lora_b, scaling) in chosen.items():
        rank = lora_a.shape[0]
        a[g, :rank].copy_(lora_a)  # copy_ also converts the dtype
        torch.mul(lora_b.T.to(bt.dtype), scaling, out=bt[g, :rank])


@dataclass
class MultiLoRA:
    """Handle on a model after `attach_multi_lora`: its wrapped layers, their slot stacks, their shared `LoRABatch`,
    and slot filling."""

    layers: dict[str, MultiLoRALinear]
    """Wrapped layers by full module name (e.g. `model.layers.0.self_attn.q_proj`)."""
    stacks: list[SlotStack]
    """The layers' slot buffers, one stack per (in, out) shape."""
    batch: LoRABatch
    """The slot selection every wrapped layer reads."""
    n_slots: int
    """Adapter slots (the zero slot excluded)."""
    max_rank: int
    """Largest adapter rank a slot holds."""

    @contextlib.contextmanager
    def select(self, idx: Sequence[int], ahead: int | None = None, first: int = 0) -> Iterator[None]:
        """Run the forwards inside the block with batch row first + n using slot `idx[n]` (-1: base model only);
        `ahead` as in `LoRABatch.set`."""
        self.batch.set(idx, ahead, first)
        try:
            yield
        finally:
            self.batch.clear()

    @torch.no_grad()
    def pack(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
             into: PackedAdapter | None = None) -> PackedAdapter:
        """Lay out {module name: (A [r, I], B [O, r], scaling)} as the stacks hold it, on the CPU, in the slots'
        dtype (r <= max_rank; wrapped layers not named get zeros).

        `into`: an earlier pack of this model whose memory may be overwritten (an evicted CPU copy). Fresh memory
        costs its first touch: writing a 9.8 MB SmolLM2 adapter into new pages took 6.5 ms on this project's 2-core
        VM, against 1.1 ms into touched ones, most of the difference between a disk load with a full CPU tier and
        one with a growing tier."""
        unknown = set(weights) - set(self.layers)
        if unknown:
            raise KeyError(f"adapter targets modules that are not wrapped: {sorted(unknown)[:3]}")
        members: list[dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = [{} for _ in self.stacks]
        index = {id(stack): i for i, stack in enumerate(self.stacks)}
        for name, (lora_a, lora_b, scaling) in weights.items():
            if lora_a.shape[0] > self.max_rank:
                raise ValueError(f"adapter rank {lora_a.shape[0]} exceeds the slot capacity max_rank={self.max_rank}")
            layer = self.layers[name]
            members[index[id(layer._stack)]][layer._position] = (lora_a, lora_b, scaling)
        packed = into if into is not None else PackedAdapter(
            [torch.empty(stack.a[:, 0].shape, dtype=stack.a.dtype) for stack in self.stacks],
            [torch.empty(stack.bt[:, 0].shape, dtype=stack.bt.dtype) for stack in self.stacks])
        for stack, chosen, a, bt in zip(self.stacks, members, packed.a, packed.bt, strict=True):
            if a.shape != stack.a[:, 0].shape or bt.shape != stack.bt[:, 0].shape:
                raise ValueError(f"`into` was packed for another model: A {tuple(a.shape)}, B^T {tuple(bt.shape)} "
                                 f"against {tuple(stack.a[:, 0].shape)}, {tuple(stack.bt[:, 0].shape)}")
            full = len(chosen) == len(stack.a) and all(w.shape[0] == self.max_rank for w, _, _ in chosen.values())
            (_pack_full if full else _pack_padded)(chosen, a, bt)
        return packed

    @torch.no_grad()
    def load_slot(self, slot: int, packed: PackedAdapter) -> None:
        """Fill `slot` from an adapter `pack` laid out: one copy per stack."""
        self._check_slot(slot)
        for stack, a, bt in zip(self.stacks, packed.a, packed.bt, strict=True):
            stack.a[:, slot].copy_(a, non_blocking=True)
            stack.bt[:, slot].copy_(bt, non_blocking=True)
        self._rewrote(slot)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero `slot` in every wrapped layer, so a row pointing at it gets the base output."""
        self._check_slot(slot)
        for stack in self.stacks:
            stack.a[:, slot].zero_()
            stack.bt[:, slot].zero_()
        self._rewrote(slot)

    def slot_nbytes(self) -> int:
        """Bytes one slot takes across all wrapped layers."""
        return sum((s.a[:, 0].numel() + s.bt[:, 0].numel()) * s.a.element_size() for s in self.stacks)

    def _rewrote(self, slot: int) -> None:
        self.batch.rewrote(slot)
        if self.batch.merge_single_slot:
            for layer in self.layers.values():
                layer.forget_merge(slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.n_slots})")


MERGE_STEPS_PER_SIZE_RATIO = 0.3
"""Break-even forwards per unit of (wrapped weight elements / one slot's elements). Measured at SmolLM2-135M's width
(one thread): a merge took ~105 ms and an unmerged forward ~8 ms more than a merged one, so ~13 forwards at a size
ratio of 43.5 (106 M wrapped weight elements, 2.44 M per r = 8 slot)."""


def merge_break_even(weight_numel: int, slot_numel: int) -> int:
    """Forwards after which merging one adapter into the weights pays for itself.

    A merge rewrites every wrapped weight (memory traffic in proportion to `weight_numel`); an unmerged forward
    reads the adapter in two small matmuls per layer (in proportion to `slot_numel`). So the break-even scales with
    their ratio: ~13 forwards at SmolLM2-135M (a size ratio of 43.5), ~46 at TinyLlama-1.1B's width (2048 x 5632,
    a ratio of 154), and 3 on the shipped tiny base. With the old fixed 16, 32-token requests at TinyLlama's width
    (4 layers) ran at 0.80x the base at concurrency 1 while their decode steps matched the base's (p50 103 against
    102 ms): each merge rewrote 704 MB of weights, more than the unmerged steps it saved."""
    return max(1, round(MERGE_STEPS_PER_SIZE_RATIO * weight_numel / max(slot_numel, 1)))


def attach_multi_lora(model: nn.Module, targets: str | Iterable[str], n_slots: int, max_rank: int,
                      max_rows: int = 256, merge_single_slot: bool = False) -> MultiLoRA:
    """Swap every `nn.Linear` of `model` whose name matches `targets` (PEFT's `target_modules` rule) for a
    `MultiLoRALinear` with `n_slots` slots of rank `max_rank`, in place; returns the handle that fills the slots.

    `merge_single_slot` enables the merged-weight path for forwards where all rows share one slot."""
    weight = next(model.parameters())
    chosen = find_linears(model, targets)
    if not chosen:
        raise ValueError(f"no nn.Linear in the model matches target modules {targets!r}")
    slot_numel = sum(max_rank * (module.in_features + module.out_features) for _, module in chosen)  # A + B^T
    batch = LoRABatch(max_rows=max_rows, zero_slot=n_slots, device=weight.device, merge_single_slot=merge_single_slot,
                      merge_after=merge_break_even(sum(module.weight.numel() for _, module in chosen), slot_numel))
    groups: dict[tuple, list[tuple[str, nn.Linear]]] = {}
    for name, module in chosen:
        key = (module.in_features, module.out_features, module.weight.dtype, module.weight.device)
        groups.setdefault(key, []).append((name, module))
    layers: dict[str, MultiLoRALinear] = {}
    stacks = []
    for (in_features, out_features, _, _), members in groups.items():
        stack = SlotStack(len(members), n_slots, max_rank, in_features, out_features, like=members[0][1].weight)
        stacks.append(stack)
        for position, (name, module) in enumerate(members):
            layers[name] = MultiLoRALinear(module, stack, position, batch)
            replace_module(model, name, layers[name])
    layers = {name: layers[name] for name, _ in chosen}  # model order, as before
    return MultiLoRA(layers=layers, stacks=stacks, batch=batch, n_slots=n_slots, max_rank=max_rank)
