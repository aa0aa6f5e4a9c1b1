"""Synthetic experts for tests and benchmarks: a folder of random LoRA adapters in PEFT's own format.

The first adapter is made and saved by PEFT itself (`get_peft_model(...).save_pretrained`); the others copy its
config and key layout with fresh random tensors, which is what PEFT would write and a thousand times faster.
B is random and non-zero (a freshly initialised LoRA has B = 0 and would not change the base output).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from upcycle.io import atomic_directory
from upcycle.serving.adapters import CONFIG_NAME, WEIGHTS_NAME

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomise(tensors: dict[str, torch.Tensor], generator: torch.Generator, b_std: float) -> dict[str, torch.Tensor]:
    """Fresh A ~ N(0, 1/I) and B ~ N(0, b_std^2) with the same keys, shapes and dtypes."""
    out = {}
    for key, tensor in tensors.items():
        std = tensor.shape[1] ** -0.5 if ".lora_A." in key else b_std
        out[key] = (torch.randn(tensor.shape, generator=generator) * std).to(tensor.dtype).contiguous()
    return out


def save_peft_adapter(base: str | Path | torch.nn.Module, out_dir: str | Path, seed: int = 0, b_std: float = 0.05,
                      **lora_config) -> Path:
    """Save a random LoRA adapter for `base` (a directory or a loaded model) with PEFT's own `save_pretrained`.

    `lora_config` goes to `peft.LoraConfig` (r, lora_alpha, target_modules, use_rslora, rank_pattern, ...).
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base) if isinstance(base, (str, Path)) else copy.deepcopy(base)
    lora_config.setdefault("target_modules", list(DEFAULT_TARGETS))
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **lora_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(_randomise({name: param.detach()}, generator, b_std)[name])
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def save_tiny_base(path: str | Path, vocab_size: int = 4096, hidden_size: int = 128, num_layers: int = 4,
                   intermediate_size: int = 384, seed: int = 0) -> Path:
    """A random tiny Llama plus a byte-level BPE trained on a few standard-library packages (benchmarks, load tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from upcycle.data.corpus import stdlib_root
    from upcycle.models.tokenizer import train_bpe_tokenizer

    path = Path(path)
    files = sorted((stdlib_root() / "json").glob("*.py")) + sorted((stdlib_root() / "email").glob("*.py"))
    tokenizer = train_bpe_tokenizer([f.read_text(encoding="utf-8") for f in files], vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def synthetic_name(index: int) -> str:
    """The default name of synthetic expert `index` (`expert-00003`, the form introvert runs use)."""
    return f"expert-{index:05d}"


def write_synthetic_experts(experts_dir: str | Path, base_dir: str | Path, n_experts: int, rank: int = 8,
                            lora_alpha: float = 16.0, targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0,
                            b_std: float = 0.05, first: int = 0,
                            name: Callable[[int], str] = synthetic_name) -> dict[str, Path]:
    """Write `n_experts` random LoRA experts for the base at `base_dir` into `experts_dir`/<name(i)>; returns the
    {name: directory} table the engine takes. Each directory appears complete (atomic rename)."""
    from safetensors.torch import load_file, save_file

    experts_dir = Path(experts_dir)
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="upcycle-template-") as scratch:
        template = save_peft_adapter(base_dir, Path(scratch) / "template", seed=seed, b_std=b_std, r=rank,
                                     lora_alpha=lora_alpha, target_modules=list(targets))
        config, layout = (template / CONFIG_NAME).read_bytes(), load_file(template / WEIGHTS_NAME)
    experts = {}
    for index in range(first, first + n_experts):
        experts[name(index)] = experts_dir / name(index)
        with atomic_directory(experts[name(index)]) as tmp:
            (tmp / CONFIG_NAME).write_bytes(config)
            save_file(_randomise(layout, generator, b_std), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    return experts


CORRUPTIONS = ("non_object_entry", "rank_zero", "nested_header", "nested_config")
"""Ways `write_corrupt_adapter` damages an adapter: each once escaped the reader and stopped the server."""


def write_corrupt_adapter(good: str | Path, out: str | Path, kind: str) -> Path:
    """Copy the PEFT adapter `good` to `out`, damaged as `kind` says (one of CORRUPTIONS); for hostile-input tests.

    non_object_entry: a safetensors header entry that is a number; rank_zero: every LoRA matrix with rank 0 (and a
    well-formed file); nested_header / nested_config: JSON nested 100,000 deep in the header / adapter_config.json.
    """
    import json
    import struct

    good, out = Path(good), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(good, out)
    weights = out / WEIGHTS_NAME
    raw = weights.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8: 8 + header_len]), raw[8 + header_len:]
    names = [name for name in header if name != "__metadata__"]
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    if kind == "non_object_entry":  # first, so no other check trips before it; the data stays in place
        new_header = json.dumps({names[0]: 5, **{name: header[name] for name in names[1:]}}).encode()
    elif kind == "rank_zero":  # A [0, I] and B [O, 0]: no bytes at all
        body = b""
        zero = {name: {"dtype": header[name]["dtype"], "data_offsets": [0, 0],
                       "shape": [0, header[name]["shape"][1]] if ".lora_A." in name else [header[name]["shape"][0], 0]}
                for name in names}
        new_header = json.dumps(zero).encode()
    elif kind == "nested_header":
        new_header, body = deep, b""
    elif kind == "nested_config":
        (out / CONFIG_NAME).write_bytes(deep)
        return out
    else:
        raise ValueError(f"unknown corruption {kind!r}; one of {CORRUPTIONS}")
    weights.write_bytes(struct.pack("<Q", len(new_header)) + new_header + body)
    return out
