"""The FLOP formulas agree with torch's FlopCounterMode on real forward passes (dense, sparse, whole decoder)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from upcycle.ops.flops import DecoderShape, decoder_flops, ffn_flops, sparse_ffn_flops
from upcycle.ops.reference_ffn import reference_masked_ffn
from upcycle.ops.sparse_ffn import SparseFFN


def counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def assert_within(ours: int, torch_count: int, tolerance: float = 0.02) -> None:
    assert torch_count > 0
    assert abs(ours - torch_count) / torch_count <= tolerance, (ours, torch_count)


def test_dense_and_sparse_ffn():
    g = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down = torch.randn(96, 32, generator=g), torch.randn(96, 32, generator=g), torch.randn(32, 96)
    x = torch.randn(5, 32, generator=g)
    assert_within(ffn_flops(5, 32, 96), counted(lambda: reference_masked_ffn(x, w_gate, w_up, w_down,
                                                                            torch.ones(5, 96))))
    shared = torch.zeros(96)
    shared[:30] = 1
    experts = torch.zeros(3, 96)
    experts[0, 30:50], experts[1, 40:70], experts[2, 70:90] = 1, 0.5, 1
    op = SparseFFN.from_dense(w_gate, w_up, w_down, shared, experts)
    for idx in (torch.tensor([[1]]), torch.tensor([[0, 2]]), torch.tensor([[0], [2], [2], [1], [0]]),
                torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]])):
        rows = x[: idx.shape[0]]
        neurons = int(op.active_neurons(idx).sum())
        assert_within(sparse_ffn_flops(32, neurons), counted(lambda: op(rows, idx)))  # noqa: B023


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation="eager", **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(("batch", "prompt"), [(1, 12), (3, 7)])
def test_whole_decoder_prefill_and_decode_step(batch, prompt):
    model = tiny_llama()
    shape = DecoderShape.from_config(model.config)
    ids = torch.randint(0, 300, (batch, prompt + 1), generator=torch.Generator().manual_seed(2))
    assert_within(decoder_flops(shape, batch, prompt)["total"], counted(lambda: model(input_ids=ids[:, :prompt])))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :prompt], use_cache=True).cache
    step = counted(lambda: model(input_ids=ids[:, prompt:], cache=cache, use_cache=True))
    assert_within(decoder_flops(shape, batch, 1, past=prompt)["total"], step)


def test_whole_decoder_with_compact_sparse_ffns():
    from upcycle.masks.config import MaskConfig
    from upcycle.masks.method.compact import compact_layers, compact_model
    from upcycle.masks.method.surgery import add_masks, masked_ffns

    model = tiny_llama()
    add_masks(model, MaskConfig(experts=4, top_k=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in masked_ffns(model):
            layer.gates.log_alpha.copy_(torch.rand(layer.gates.log_alpha.shape, generator=g) * 12 - 9)
    compact_model(model.eval())
    ids = torch.randint(0, 300, (2, 9), generator=g)
    neurons, experts = [], []

    def count(layer, args, output) -> None:  # the neurons the sparse FFN computes for these tokens
        neurons.append(int(layer.ffn.active_neurons(layer.router(args[0].reshape(-1, 64)).expert_idx).sum()))
        experts.append(layer.router.num_experts)

    hooks = [layer.register_forward_hook(count) for _, layer in compact_layers(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert sum(neurons) < 0.8 * 3 * 18 * 160  # the masks really skip neurons
    ours = decoder_flops(DecoderShape.from_config(model.config), 2, 9, ffn_neurons=neurons, router_experts=experts)
    assert_within(ours["total"], counted(lambda: model(input_ids=ids)))
