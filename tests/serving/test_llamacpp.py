"""The llama.cpp peer's converters (HF Llama -> F32 GGUF, PEFT LoRA -> GGUF LoRA) and its bad inputs.

Everything here but the last test runs without llama-cpp-python: the converters need only `gguf`, and the extra's
absence is checked before any import.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import save_tiny_llama

from upcycle.errors import UserError
from upcycle.serving import llamacpp


def rotary_permute_reference(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Loop form: in each head of D rows, GGUF row 2i is HF row i and GGUF row 2i+1 is HF row D/2 + i."""
    out = np.empty_like(rows)
    head_dim = rows.shape[0] // n_head
    for h in range(n_head):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = rows[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = rows[h * head_dim + head_dim // 2 + i]
    return out


@pytest.mark.parametrize(("n_head", "head_dim", "cols"), [(1, 2, 1), (4, 8, 3), (2, 16, 5)])
def test_rotary_permute_matches_the_loop(n_head, head_dim, cols):
    rows = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(llamacpp.rotary_permute(rows, n_head), rotary_permute_reference(rows, n_head))


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with grouped-query attention (4 query, 2 KV heads) and an untied head."""
    return save_tiny_llama(tmp_path_factory.mktemp("gqa"), tiny_tokenizer, num_key_value_heads=2,
                           tie_word_embeddings=False)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, gqa_llama) -> Path:
    from upcycle.serving.synthetic import save_peft_adapter

    return save_peft_adapter(gqa_llama, tmp_path_factory.mktemp("adapter") / "a", seed=1, b_std=0.2, r=4,
                             lora_alpha=8, use_rslora=True)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader

    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def test_base_gguf_holds_every_weight_renamed_and_permuted(gqa_llama, tmp_path):
    from safetensors.numpy import load_file

    out = llamacpp.convert_base(gqa_llama, tmp_path / "base.gguf")
    gguf, hf = _tensors(out), load_file(gqa_llama / "model.safetensors")
    assert len(gguf) == len(hf)
    np.testing.assert_array_equal(gguf["blk.1.attn_q.weight"],
                                  rotary_permute_reference(hf["model.layers.1.self_attn.q_proj.weight"], 4))
    np.testing.assert_array_equal(gguf["blk.0.attn_k.weight"],
                                  rotary_permute_reference(hf["model.layers.0.self_attn.k_proj.weight"], 2))
    np.testing.assert_array_equal(gguf["blk.0.attn_v.weight"], hf["model.layers.0.self_attn.v_proj.weight"])
    np.testing.assert_array_equal(gguf["output.weight"], hf["lm_head.weight"])
    np.testing.assert_array_equal(gguf["token_embd.weight"], hf["model.embed_tokens.weight"])


def test_lora_gguf_is_peft_delta_with_scaling_folded_in(gqa_llama, adapter, tmp_path):
    """B_gguf @ A_gguf equals PEFT's own delta (scaling * B @ A, from the model PEFT builds), rows permuted for q/k."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gguf = _tensors(llamacpp.convert_adapter(adapter, gqa_llama, tmp_path / "lora.gguf"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gqa_llama), adapter)
    for layer, proj, name, heads in ((0, "q_proj", "attn_q", 4), (1, "k_proj", "attn_k", 2),
                                     (1, "down_proj", "ffn_down", None)):
        block = peft.base_model.model.model.layers[layer]
        module = getattr(block.self_attn if "proj" in proj and proj[0] in "qkvo" else block.mlp, proj)
        expected = module.get_delta_weight("default").detach().numpy()  # [O, I]
        if heads is not None:
            expected = rotary_permute_reference(expected, heads)
        delta = gguf[f"blk.{layer}.{name}.weight.lora_b"] @ gguf[f"blk.{layer}.{name}.weight.lora_a"]
        np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)


def test_lora_for_another_base_is_one_line_error(gqa_llama, adapter, tiny_tokenizer, tmp_path):
    from upcycle.serving.synthetic import save_peft_adapter

    base = llamacpp.convert_base(gqa_llama, tmp_path / "base.gguf")
    ours = llamacpp.convert_adapter(adapter, gqa_llama, tmp_path / "ours.gguf")
    llamacpp.check_lora_for_base(base, ours)  # the right base: no error
    wider = save_tiny_llama(tmp_path / "wider", tiny_tokenizer, hidden_size=48)
    theirs = llamacpp.convert_adapter(save_peft_adapter(wider, tmp_path / "theirs", r=4), wider,
                                      tmp_path / "theirs.gguf")
    with pytest.raises(UserError, match="a LoRA for another base") as error:
        llamacpp.check_lora_for_base(base, theirs)
    assert "\n" not in str(error.value)


def test_not_a_gguf_lora_is_one_line_error(gqa_llama, tmp_path):
    base = llamacpp.convert_base(gqa_llama, tmp_path / "base.gguf")
    with pytest.raises(UserError, match="no .lora_a"):
        llamacpp.check_lora_for_base(base, base)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(UserError, match="not a readable GGUF"):
        llamacpp.check_lora_for_base(base, tmp_path / "junk.gguf")


def test_missing_extra_is_one_line_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"llamacpp extra.*pip install 'upcycle\[llamacpp\]'") as error:
        llamacpp.require_llama_cpp()
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_llama_cpp_runs_the_converted_model_like_transformers(gqa_llama, adapter, tmp_path):
    """With the extra installed: llama.cpp's greedy tokens on the converted F32 model and LoRA equal PEFT's."""
    pytest.importorskip("llama_cpp")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = llamacpp.convert_base(gqa_llama, tmp_path / "base.gguf")
    lora = llamacpp.convert_adapter(adapter, gqa_llama, tmp_path / "lora.gguf")
    peer = llamacpp.LlamaCppPeer(base, {"a": lora}, n_ctx=64)
    prompt = list(range(5, 15))
    for name, model in ((None, AutoModelForCausalLM.from_pretrained(gqa_llama)),
                        ("a", PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gqa_llama), adapter))):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
        got = peer.generate(prompt, name, 8)
        if len(expected) < 8:  # transformers stops at the end-of-sequence token; the peer runs its 8 steps
            assert int(expected[-1]) == model.config.eos_token_id
            got = got[:len(expected)]
        assert got == expected.tolist()
    peer.close()
