"""Analysis and compaction: the compact model's logits equal the masked model's in eval mode; export round trip."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import shape_gates, tiny_decoder
from upcycle.errors import UserError
from upcycle.masks.config import MaskConfig
from upcycle.masks.method.analysis import analyze_masks
from upcycle.masks.method.compact import compact_layers, compact_model, packed_rows
from upcycle.masks.method.export import load_compact, save_compact
from upcycle.masks.method.surgery import add_masks, masked_ffns

TOKENS = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))


def masked_tiny(dtype=torch.float64, **mask_settings):
    model = tiny_decoder(dtype=dtype)
    add_masks(model, MaskConfig(**({"experts": 4, "top_k": 2} | mask_settings)))
    shape_gates(model, shared=slice(0, 10), dead=slice(10, 18))
    return model.eval()


@pytest.mark.parametrize(("routing", "k"), [("topk", 1), ("topk", 2), ("soft", 1)])
def test_structural_compaction_is_exact(routing, k):
    model = masked_tiny(routing=routing, top_k=k)
    want = model(input_ids=TOKENS).logits
    layouts = compact_model(model)
    assert not masked_ffns(model) and len(compact_layers(model)) == 2
    for layout in layouts.values():
        assert layout["sizes"][0] >= 10  # the forced-open neurons, plus any that happen to be open everywhere
        assert len(layout["sizes"]) == 5
    for _, layer in compact_layers(model):
        kept = set(layer.ffn.neuron.tolist())
        assert kept.isdisjoint(range(10, 18))  # closed everywhere: dropped
    torch.testing.assert_close(model(input_ids=TOKENS).logits, want, rtol=1e-10, atol=1e-10)


def routed_by_bias(model):
    """Expert 0 chosen by every token, expert 3 by none, expert 2 keeps no neuron."""
    with torch.no_grad():
        for _, layer in masked_ffns(model):
            layer.router.proj.bias.copy_(torch.tensor([50.0, 0.0, 0.0, -50.0], dtype=torch.float64))
            layer.gates.log_alpha[2] = -5.0


def test_analysis_classifies_experts_and_neurons():
    model = masked_tiny(router_bias=True)
    routed_by_bias(model)
    labels = TOKENS.clone()
    labels[2, 5:] = -100  # padding is not counted
    analysis = analyze_masks(model, TOKENS, labels)
    assert analysis.tokens == 25
    for report in analysis.layers:
        assert report.expert_usage[0] == 1.0 and report.expert_usage[3] == 0.0
        assert report.expert_kinds[0] == "shared" and report.expert_kinds[3] == "inactive"
        assert report.expert_kinds[2] == "inactive"  # chosen, but its mask is empty
        assert sum(report.neuron_kinds.values()) == 64 and report.neuron_kinds["shared"] >= 10
        assert report.neuron_kinds["inactive"] >= 8
        assert sum(report.expert_usage) == pytest.approx(2.0)  # top-2
    assert analysis.unused_experts() == {"model.layers.0.mlp": [3], "model.layers.1.mlp": [3]}
    assert set(analysis.to_dict()["experts"]) == {"shared", "token-specific", "inactive"}


def test_compaction_with_analysis_drops_unused_experts_and_is_exact_on_analysed_tokens():
    model = masked_tiny(router_bias=True)
    routed_by_bias(model)
    want = model(input_ids=TOKENS).logits
    analysis = analyze_masks(model, TOKENS)
    structural = masked_tiny(router_bias=True)
    routed_by_bias(structural)
    structural_sizes = compact_model(structural)["model.layers.0.mlp"]["sizes"]
    expected_rows = packed_rows(model, analysis)  # before compaction: what it will store
    layouts = compact_model(model, analysis)
    assert expected_rows == (sum(sum(layout["sizes"]) for layout in layouts.values()), 2 * 64)
    sizes = layouts["model.layers.0.mlp"]["sizes"]
    assert len(sizes) == 4  # expert 3 left the router
    assert sizes[0] > structural_sizes[0]  # expert 0's neurons joined the shared block
    torch.testing.assert_close(model(input_ids=TOKENS).logits, want, rtol=1e-10, atol=1e-10)


def test_export_round_trip(tmp_path):
    model = masked_tiny(dtype=torch.float32)
    compact_model(model)
    want = model(input_ids=TOKENS).logits
    out = save_compact(model, tmp_path / "compact", extra={"target": 0.5})
    loaded = load_compact(out)
    assert type(loaded).__name__ == "LlamaForCausalLM" and len(compact_layers(loaded)) == 2
    torch.testing.assert_close(loaded(input_ids=TOKENS).logits, want, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_loading_something_else_is_refused(tmp_path):
    tiny_decoder().save_pretrained(tmp_path / "dense")
    with pytest.raises(UserError, match="not a compact mask model"):
        load_compact(tmp_path / "dense")
    with pytest.raises(UserError, match="no compact layers"):
        save_compact(tiny_decoder(), tmp_path / "x")
