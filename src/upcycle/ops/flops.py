"""Matmul FLOP counts for dense and sparse SwiGLU FFNs and a whole Llama-style decoder forward pass.

The convention is `torch.utils.flop_counter.FlopCounterMode`'s: a [M, K] @ [K, N] matmul is 2·M·K·N FLOPs, and
elementwise work (activations, norms, rotary, softmax, residuals) is not counted; it is a few per cent of the
total at these sizes. Attention scores are counted as computed by eager attention: every query against every key
in the cache (Q·Kᵀ and P·V over the full [new, past + new] rectangle; the causal mask saves nothing).

Legend: B batch, T = B·new tokens, D model dim, I intermediate neurons, H / KV query / key-value heads, hd head dim,
V vocabulary, E router experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    """[rows, inner] @ [inner, cols]."""
    return 2 * rows * inner * cols


def ffn_flops(tokens: int, hidden: int, intermediate: int) -> int:
    """Dense SwiGLU FFN: gate, up ([T, D] @ [D, I]) and down ([T, I] @ [I, D])."""
    return 3 * matmul_flops(tokens, hidden, intermediate)


def sparse_ffn_flops(hidden: int, neurons: int, tokens: int = 0, experts: int = 0) -> int:
    """Sparse SwiGLU FFN that computes `neurons` (token, neuron) pairs in all, plus a [T, D] @ [D, E] router.

    `neurons` is the sum over tokens of the neurons computed for each (e.g. `SparseFFN.active_neurons(...).sum()`);
    a dense FFN is neurons = T·I, experts = 0.
    """
    return 3 * 2 * hidden * neurons + matmul_flops(tokens, hidden, experts)


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that set a Llama/Mistral/Qwen2-style decoder's FLOPs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From a Hugging Face config."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab=config.vocab_size)


def decoder_flops(shape: DecoderShape, batch: int, new_tokens: int, past: int = 0,
                  ffn_neurons: Sequence[int] | None = None, router_experts: Sequence[int] | int = 0,
                  logits_tokens: int | None = None) -> dict[str, int]:
    """FLOPs of one forward pass over `new_tokens` per sequence with `past` cached positions, by part.

    ffn_neurons: per layer, the (token, neuron) pairs its FFN computes (None: dense, T·I each). router_experts:
    experts scored per layer (an int for all layers). logits_tokens: positions that get logits (None: all T).
    """
    tokens = batch * new_tokens
    keys = past + new_tokens
    d, q_dim, kv_dim = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    neurons = list(ffn_neurons) if ffn_neurons is not None else [tokens * shape.intermediate] * shape.layers
    if len(neurons) != shape.layers:
        raise ValueError(f"ffn_neurons has {len(neurons)} entries for {shape.layers} layers")
    experts = [router_experts] * shape.layers if isinstance(router_experts, int) else list(router_experts)
    projections = (matmul_flops(tokens, d, q_dim) + 2 * matmul_flops(tokens, d, kv_dim)
                   + matmul_flops(tokens, q_dim, d))
    scores = 2 * matmul_flops(batch * shape.heads * new_tokens, shape.head_dim, keys)  # Q·Kᵀ and P·V
    parts = {
        "attention_projections": shape.layers * projections,
        "attention_scores": shape.layers * scores,
        "ffn": sum(3 * 2 * d * n for n in neurons),
        "router": sum(matmul_flops(tokens, d, e) for e in experts),
        "lm_head": matmul_flops(tokens if logits_tokens is None else logits_tokens, d, shape.vocab),
    }
    parts["total"] = sum(parts.values())
    return parts
