"""Shared fixtures: a tiny tokenizer and tiny random HF causal LMs built locally (no hub, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("UPCYCLE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI sets it: errors stay one line


def small_corpus_texts() -> list[str]:
    """A few hundred KB of real text: standard-library modules from three different topics."""
    from upcycle.data.corpus import stdlib_root

    root = stdlib_root()
    names = ["json/decoder.py", "json/encoder.py", "email/message.py", "email/utils.py", "asyncio/queues.py",
             "asyncio/locks.py", "textwrap.py", "heapq.py", "bisect.py", "fractions.py"]
    return [(root / n).read_text(encoding="utf-8") for n in names]


def stdlib_code_dir(root: Path, modules: list[str]) -> Path:
    """Copy standard-library `modules` (paths like 'json/decoder.py') flat into `root`, renamed by path so that
    names do not clash: a small code corpus for the instruction-mixture tests."""
    import shutil

    from upcycle.data.corpus import stdlib_root

    for name in modules:
        shutil.copyfile(stdlib_root() / name, root / name.replace("/", "_"))
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token byte-level BPE trained on a handful of stdlib files, saved in HF format."""
    from transformers import AutoTokenizer

    from upcycle.models.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(small_corpus_texts(), vocab_size=512).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def save_tiny_llama(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny Llama (hidden 32, 2 layers) with `tokenizer` to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                    tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**settings | overrides)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Directory of a random tiny Llama + tokenizer, loadable with AutoModelForCausalLM.from_pretrained."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def one_torch_thread():
    """Tiny models on 2 shared cores: a second intra-op thread only spins against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
