"""Tiny in-memory decoders for the mask tests (no tokenizer, no files)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from upcycle.masks.config import MaskConfig, MaskTrainConfig


def tiny_decoder(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random tiny causal LM of the given family: hidden 32, FFN 64, 2 layers, vocab 97."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    settings = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return model_class(config_class(**(settings | overrides))).to(dtype).eval()


def randomize_gates(model, seed: int = 0, low: float = -4.0, high: float = 4.0) -> None:
    """Spread every gate's log α so that eval masks mix 0, fractional and 1 values."""
    from upcycle.masks.method.surgery import masked_ffns

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in masked_ffns(model):
            la = layer.gates.log_alpha
            la.copy_((torch.rand(la.shape, generator=g) * (high - low) + low).to(la.dtype))


def shape_gates(model, shared: slice, dead: slice, seed: int = 0) -> None:
    """Random gates, then neurons in `shared` fully open in every expert and neurons in `dead` closed in all."""
    from upcycle.masks.method.surgery import masked_ffns

    randomize_gates(model, seed)
    with torch.no_grad():
        for _, layer in masked_ffns(model):
            layer.gates.log_alpha[:, shared] = 5.0
            layer.gates.log_alpha[:, dead] = -5.0


def corpus_dir(tmp_path: Path) -> Path:
    """A folder of 16 real standard-library modules: enough documents for train / validation / test splits."""
    from upcycle.data.corpus import stdlib_root

    root = tmp_path / "corpus"
    root.mkdir()
    for name in ["json/decoder.py", "json/encoder.py", "email/message.py", "email/utils.py", "textwrap.py",
                 "heapq.py", "bisect.py", "fractions.py", "asyncio/queues.py", "asyncio/locks.py", "string.py",
                 "shlex.py", "glob.py", "fnmatch.py", "colorsys.py", "calendar.py"]:
        (root / name.replace("/", "_")).write_text((stdlib_root() / name).read_text(encoding="utf-8"))
    return root


def small_recipe(target: float = 0.6, experts: int = 4, steps: int = 12, batch_size: int = 2,
                 block_size: int = 32) -> MaskTrainConfig:
    """The mask commands' --recipe at a test's size: the defaults of the command line otherwise, with a checkpoint
    every tenth of the steps and the warm-up cut to the run."""
    train = replace(MaskTrainConfig().train, steps=steps, batch_size=batch_size, warmup_steps=min(10, steps),
                    checkpoint_every=max(1, steps // 10))
    return MaskTrainConfig(target=target, masks=MaskConfig(experts=experts), block_size=block_size, train=train)
