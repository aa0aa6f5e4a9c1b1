"""Save a compacted mask model as a Hugging Face-style directory and load it back.

```
OUT/
  config.json         the base model's config plus an `upcycle_compact` section: format and each compact layer's
                      layout (shared rows, rows per expert, routing, top-k)
  model.safetensors   every tensor: the base model's attention/embeddings/norms and each layer's router and packed
                      sparse FFN (`mlp.ffn.w_gate_up`, `mlp.ffn.w_down_t`, `mlp.ffn.value`, `mlp.ffn.neuron`, ...)
  tokenizer files     when a tokenizer is given
```
`load_compact(OUT)` rebuilds the base architecture from config.json, swaps in empty compact layers of the stored
layouts and loads the weights. Plain `AutoModelForCausalLM.from_pretrained(OUT)` would not know the compact
layers; use `load_compact`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.io import atomic_directory, read_json, write_json
from upcycle.masks.method.compact import CompactFFN, compact_layers
from upcycle.models.surgery import replace_module

FORMAT = 1
SECTION = "upcycle_compact"


def save_compact(model: nn.Module, out: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write `model` (already compacted) to `out` atomically. `extra` is stored in the config section."""
    from safetensors.torch import save_file

    layers = compact_layers(model)
    if not layers:
        raise UserError("the model has no compact layers; run compaction before exporting")
    out = Path(out)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for name in _tied_duplicates(model):  # safetensors refuses shared storage; tied copies are re-tied on load
        state.pop(name, None)
    config = model.config.to_dict()
    config[SECTION] = {"format": FORMAT, "layers": {name: layer.layout() for name, layer in layers},
                       **(extra or {})}
    with atomic_directory(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def load_compact(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a directory written by `save_compact` (from_pretrained-style). Returns the model in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.activations import ACT2FN

    path = Path(path)
    raw = read_json(path / "config.json")
    section = raw.get(SECTION)
    if not section:
        raise UserError(f"{path} is not a compact mask model (config.json has no '{SECTION}' section); "
                        "load it with AutoModelForCausalLM.from_pretrained instead")
    if section.get("format") != FORMAT:
        raise UserError(f"{path}: compact format {section.get('format')} is not supported (expected {FORMAT})")
    config = AutoConfig.from_pretrained(path)
    dtype = dtype or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    act = ACT2FN[config.hidden_act]
    for name, layout in section["layers"].items():
        replace_module(model, name, CompactFFN.empty(layout, act, dtype))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_duplicates(model)]
    if missing or unexpected:
        raise UserError(f"{path}/model.safetensors does not match its config ({len(missing)} missing tensors, "
                        f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}); re-export the model")
    return model.eval()


def _tied_duplicates(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (e.g. a tied lm_head)."""
    seen, duplicates = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if tensor.numel() and key in seen:
            duplicates.add(name)
        seen.setdefault(key, name)
    return duplicates

