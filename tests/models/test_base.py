import pytest

from upcycle.errors import UserError
from upcycle.models.base import base_fingerprint, load_base, resolve_base


def test_missing_and_non_model_directories_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_base(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_base(str(tmp_path / "empty"))


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mistral"])
def test_other_families_load_from_local_directories(tmp_path, tiny_tokenizer, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=len(tiny_tokenizer))
    if family == "gpt2":
        kwargs |= dict(n_embd=32, n_layer=1, n_head=2, n_positions=128)
    else:
        kwargs |= dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_base(str(tmp_path), device="cpu")
    assert model.config.model_type == family and tokenizer.pad_token is not None


def test_fingerprint_tells_bases_apart(tmp_path, tiny_tokenizer):
    from tests.conftest import save_tiny_llama

    a = save_tiny_llama(tmp_path / "a", tiny_tokenizer, seed=0)
    b = save_tiny_llama(tmp_path / "b", tiny_tokenizer, seed=1)
    assert base_fingerprint(str(a)) != base_fingerprint(str(b))
    assert base_fingerprint(str(a)) == base_fingerprint(str(a))
