"""Grouped SwiGLU experts: every expert runs its FFN on its own contiguous segment of a sorted token buffer.

Legend used in shape notes: S rows of the sorted buffer (token-expert assignments), E experts, D model dim,
F expert FFN dim, C rows per expert after padding.

The rows of `x` are sorted by expert: rows [offset[e], offset[e] + counts[e]) belong to expert e. Three backends
compute the same thing (`ops.reference_moe.reference_grouped_swiglu` states it as a loop):

- "grouped_mm": `torch._grouped_mm` (CPU kernel since torch 2.9; float32 / bfloat16 / float16, 16-byte aligned).
- "loop":       one matmul per non-empty expert segment.
- "padded_bmm": pad every segment to the largest one and run two `torch.bmm`s. It wastes the padded rows but on a
                CPU one batched GEMM per projection beats E small GEMMs (see benchmarks/moe_layer.py).
"auto" picks grouped_mm on CUDA, and on CPU padded_bmm unless the routing is so unbalanced that padding would add
more than MAX_PADDING of the rows. grouped_mm falls back to loop for operands it cannot take.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from upcycle.errors import UserError

BACKENDS = ("auto", "grouped_mm", "loop", "padded_bmm")
MAX_PADDING = 0.3  # padded_bmm measured ~1.3-1.6x faster than grouped_mm at 5 % padding, 2 threads (benchmarks/)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Activation = Callable[[torch.Tensor], torch.Tensor]


def resolve_backend(backend: str, *tensors: torch.Tensor, counts: torch.Tensor | None = None) -> str:
    """The concrete backend that "auto" (or a request the kernel cannot serve) means for these operands.

    On a CPU "auto" pads (one bmm per projection) unless the padding would add more than MAX_PADDING of the rows,
    as it does when the routing is very unbalanced; then grouped_mm computes only the real rows.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown grouped-experts backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "grouped_mm" if tensors[0].device.type == "cuda" else "padded_bmm"
        if backend == "padded_bmm" and counts is not None and _padding(counts) > MAX_PADDING:
            backend = "grouped_mm"
    if backend == "grouped_mm" and not _grouped_mm_supports(*tensors):
        backend = "loop"  # e.g. float64 in the reference tests, or odd sizes: same semantics, plain matmuls
    return backend


def _padding(counts: torch.Tensor) -> float:
    """Extra rows padded_bmm computes, as a fraction of the real ones: E * max(counts) / sum(counts) - 1."""
    total = int(counts.sum())
    return counts.numel() * int(counts.max()) / total - 1 if total else 0.0


def _grouped_mm_supports(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm wants float32/bf16/fp16, 16-byte aligned pointers and strides that are multiples of 16 B."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for tensor in tensors:
        size = tensor.element_size()
        if tensor.dtype not in _GROUPED_MM_DTYPES or tensor.data_ptr() % 16:
            return False
        if any((tensor.shape[d] * size) % 16 for d in range(1, tensor.dim())):
            return False
    return True


def grouped_swiglu(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    counts: torch.Tensor,
    activation: Activation = F.silu,
    backend: str = "auto",
) -> torch.Tensor:
    """SwiGLU of each expert on its segment of the expert-sorted rows `x`.

    x [S, D] sorted by expert; w_in [E, D, 2F] (gate columns first, then up); w_out [E, F, D]; counts [E] rows per
    expert (sum = S). Returns [S, D]: row r = (act(x_r W_gate) * x_r W_up) W_down of the expert that owns row r.
    """
    backend = resolve_backend(backend, x, w_in, w_out, counts=counts)
    if x.shape[0] == 0:
        return x.new_zeros(0, w_out.shape[-1])
    if backend == "grouped_mm":
        return _swiglu_grouped_mm(x, w_in, w_out, counts, activation)
    if backend == "loop":
        return _swiglu_loop(x, w_in, w_out, counts, activation)
    return _swiglu_padded_bmm(x, w_in, w_out, counts, activation)


def batched_swiglu(buffer: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: Activation = F.silu):
    """SwiGLU of expert e on buffer[e]: buffer [E, C, D] -> [E, C, D] (the fixed-capacity layout)."""
    return torch.bmm(gated(torch.bmm(buffer, w_in), activation), w_out)  # [E, C, 2F] -> [E, C, F] -> [E, C, D]


def gated(hidden: torch.Tensor, activation: Activation = F.silu) -> torch.Tensor:
    """act(gate) * up of hidden [..., 2F] = [gate | up] -> [..., F].

    For SiLU a fused autograd function writes both halves of the gradient into one [..., 2F] tensor, which saves
    the concatenation that `chunk`'s backward would do (a full pass over the largest activation).
    """
    if activation is F.silu:
        return _SiluGate.apply(hidden)
    gate, up = hidden.chunk(2, dim=-1)
    return activation(gate) * up


def _swiglu_grouped_mm(x, w_in, w_out, counts, activation):
    offsets = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's segment
    hidden = _ContiguousGrad.apply(torch._grouped_mm(x, w_in, offs=offsets))  # [S, 2F]
    return _ContiguousGrad.apply(torch._grouped_mm(gated(hidden, activation), w_out, offs=offsets))  # [S, D]


def _swiglu_loop(x, w_in, w_out, counts, activation):
    # unbind, not w_in[e]: each indexing op's backward would fill a whole [E, D, 2F] gradient; unbind's stacks once
    w_ins, w_outs = w_in.unbind(0), w_out.unbind(0)
    outputs = []
    for expert, rows in enumerate(torch.split(x, counts.tolist())):  # rows [counts[e], D]
        if rows.shape[0] == 0:
            continue
        outputs.append(gated(rows @ w_ins[expert], activation) @ w_outs[expert])  # [counts[e], 2F] -> [counts[e], D]
    return torch.cat(outputs)


def _swiglu_padded_bmm(x, w_in, w_out, counts, activation):
    num_experts, rows = counts.shape[0], x.shape[0]
    capacity = int(counts.max())
    starts = counts.cumsum(0) - counts  # [E] first row of each segment
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)  # [S]
    slot = expert_of_row * capacity + torch.arange(rows, device=x.device) - starts[expert_of_row]  # [S]
    buffer = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, slot, x)  # [E*C, D]
    out = batched_swiglu(buffer.view(num_experts, capacity, x.shape[1]), w_in, w_out, activation)  # [E, C, D]
    return out.reshape(num_experts * capacity, out.shape[-1])[slot]  # [S, D]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's CPU backward rejects stride-0 gradients (e.g. from `.sum()`), raising "Invalid
    strides/sizes"; this costs one copy only when the gradient is not already contiguous.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _SiluGate(torch.autograd.Function):
    """silu(a) * b for hidden = [a | b], with the backward written straight into one [..., 2F] gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = hidden.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(hidden, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        hidden, activated = ctx.saved_tensors
        gate, up = hidden.chunk(2, dim=-1)
        grad_hidden = torch.empty_like(hidden)
        grad_gate, grad_up = grad_hidden.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.mul(grad, up, out=grad_gate)  # then silu' in place: no [..., F] temporary
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_hidden
