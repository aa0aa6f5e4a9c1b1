"""Sparse upcycling of the tiny Llama fixture, our checkpoint format, and the Mixtral export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle.errors import UserError
from upcycle.moe.checkpoint import load_moe_model, save_moe_model
from upcycle.moe.collector import moe_layers
from upcycle.moe.config import MoEConfig, UpcycleConfig
from upcycle.moe.mixtral import export_mixtral
from upcycle.moe.upcycling import upcycle_model


@pytest.fixture
def dense(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randint(0, 500, (2, 12))


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits


@pytest.mark.parametrize("router", ["switch", "gshard", "st_moe"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("every", [1, 2])
def test_upcycled_model_reproduces_dense_logits_at_step_zero(dense, batch, router, dispatch, every):
    expected = _logits(dense, batch)
    moe = MoEConfig(num_experts=4, router=router, dispatch=dispatch, eval_capacity_factor=4.0)  # eval: no drops
    indices = upcycle_model(dense, moe, UpcycleConfig(every=every))
    assert indices == ([0, 1] if every == 1 else [1])
    assert len(moe_layers(dense)) == len(indices)
    assert (_logits(dense, batch) - expected).abs().max() <= 1e-5


def test_noise_makes_the_experts_differ(dense, batch):
    expected = _logits(dense, batch)
    upcycle_model(dense, MoEConfig(num_experts=3), UpcycleConfig(noise=0.1))
    experts = next(iter(moe_layers(dense).values())).experts
    assert not torch.equal(experts.w_in[0], experts.w_in[1])
    assert (_logits(dense, batch) - expected).abs().max() > 1e-4


def test_unsupported_base_is_a_user_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(UserError, match="cannot upcycle a 'gpt2' model"):
        upcycle_model(model, MoEConfig())


@pytest.mark.parametrize("router", ["switch", "expert_choice"])
def test_our_checkpoint_round_trips(dense, batch, tmp_path, router, tiny_tokenizer):
    moe = MoEConfig(num_experts=3, router=router, dispatch="capacity")
    indices = upcycle_model(dense, moe, UpcycleConfig(every=2, noise=0.05))
    save_moe_model(dense, tmp_path / "ckpt", moe, indices, UpcycleConfig(every=2), tokenizer=tiny_tokenizer)
    assert not (tmp_path / "ckpt" / "config.json").exists()  # transformers must not load it as the dense base
    loaded, loaded_moe, loaded_indices = load_moe_model(tmp_path / "ckpt")
    assert loaded_moe == moe and loaded_indices == indices
    torch.testing.assert_close(_logits(loaded, batch), _logits(dense, batch), rtol=0, atol=0)


def test_checkpoint_from_another_config_is_a_user_error(dense, tmp_path):
    moe = MoEConfig(num_experts=3)
    indices = upcycle_model(dense, moe)
    save_moe_model(dense, tmp_path / "ckpt", moe, indices)
    meta_path = tmp_path / "ckpt" / "moe_config.json"
    meta = json.loads(meta_path.read_text())
    meta["moe"]["num_experts"] = 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit moe_config.json") as error:
        load_moe_model(tmp_path / "ckpt")
    assert "\n" not in str(error.value)


def test_hf_checkpoint_given_to_our_loader_is_a_user_error(tiny_llama_dir):
    with pytest.raises(UserError, match="Hugging Face checkpoint"):
        load_moe_model(tiny_llama_dir)


def test_top2_model_exports_as_a_mixtral_that_transformers_loads(dense, batch, tmp_path, tiny_tokenizer):
    moe = MoEConfig(num_experts=4, router="top2", dispatch="dropless")
    indices = upcycle_model(dense, moe, UpcycleConfig(noise=0.1))
    export_mixtral(dense, moe, indices, tmp_path / "mixtral", tokenizer=tiny_tokenizer)
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert mixtral.config.model_type == "mixtral"
    assert (_logits(mixtral, batch) - _logits(dense, batch)).abs().max() <= 1e-5


def test_grouped_query_attention_and_tied_embeddings_survive_the_mixtral_export(batch, tmp_path, tiny_tokenizer):
    """SmolLM2's layout (fewer KV heads than query heads, the LM head tied to the embedding) exports as it is."""
    from tests.conftest import save_tiny_llama

    gqa = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "gqa", tiny_tokenizer,
                                                               num_key_value_heads=2)).eval()
    moe = MoEConfig(num_experts=4, router="top2", dispatch="dropless")
    indices = upcycle_model(gqa, moe, UpcycleConfig(noise=0.1))
    export_mixtral(gqa, moe, indices, tmp_path / "mixtral", tokenizer=tiny_tokenizer)
    mixtral = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert mixtral.config.num_key_value_heads == 2 and mixtral.config.tie_word_embeddings
    assert mixtral.lm_head.weight.data_ptr() == mixtral.model.embed_tokens.weight.data_ptr()
    assert (_logits(mixtral, batch) - _logits(gqa, batch)).abs().max() <= 1e-5


@pytest.mark.parametrize(("moe", "every", "match"), [
    (MoEConfig(router="switch"), 1, "only top-2"),
    (MoEConfig(router="expert_choice"), 1, "only top-2"),
    (MoEConfig(router="gshard"), 2, "every layer"),
])
def test_non_mixtral_models_refuse_to_export(dense, tmp_path, moe, every, match):
    indices = upcycle_model(dense, moe, UpcycleConfig(every=every))
    with pytest.raises(UserError, match=match):
        export_mixtral(dense, moe, indices, tmp_path / "mixtral")
