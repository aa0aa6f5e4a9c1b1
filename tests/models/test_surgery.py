"""Model surgery: finding SwiGLU FFNs and linear projections, replacing modules by dotted name."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from upcycle.errors import UserError
from upcycle.models.surgery import (
    ATTENTION_PROJECTIONS,
    decoder_mlps,
    find_ffns,
    find_linears,
    is_swiglu_ffn,
    matches_target,
    replace_module,
)


def tiny_decoder(**overrides) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_matches_target_follows_peft_rule():
    assert matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not matches_target("model.layers.0.self_attn.qq_proj", ["q_proj"])
    assert matches_target("model.layers.1.mlp.up_proj", r".*\.mlp\.(up|down)_proj")
    assert not matches_target("model.layers.1.mlp.gate_proj", r".*\.mlp\.(up|down)_proj")


def test_ffns_and_attention_projections_are_found_in_module_order():
    model = tiny_decoder()
    layers = len(model.model.layers)
    ffns = find_ffns(model)
    assert [name for name, _ in ffns] == [f"model.layers.{i}.mlp" for i in range(layers)]
    assert decoder_mlps(model) == {i: f"model.layers.{i}.mlp" for i in range(layers)}
    names = [name for name, _ in find_linears(model)]
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ATTENTION_PROJECTIONS]


def test_a_routed_ffn_is_not_a_dense_one():
    mlp = tiny_decoder().model.layers[0].mlp
    assert is_swiglu_ffn(mlp)
    mlp.router = nn.Linear(2, 2)
    assert not is_swiglu_ffn(mlp)


def test_models_without_bias_free_swiglu_ffns_are_refused():
    with pytest.raises(UserError, match="no SwiGLU FFN"):
        find_ffns(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(UserError, match="biases"):
        find_ffns(tiny_decoder(mlp_bias=True))


def test_replace_module_swaps_by_dotted_name_and_can_keep_the_mode():
    model = tiny_decoder().eval()
    new = nn.Identity()
    old = replace_module(model, "model.layers.1.mlp", new, keep_mode=True)
    assert model.model.layers[1].mlp is new and is_swiglu_ffn(old) and not new.training
    top = nn.Identity()
    replace_module(model, "lm_head", top)
    assert model.lm_head is top and top.training  # without keep_mode the new module keeps its own mode
