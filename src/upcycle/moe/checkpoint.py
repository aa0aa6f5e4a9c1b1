"""Our checkpoint format for upcycled models: `moe_config.json` (base config, MoE config, MoE layer indices) and
`model.safetensors`, plus the tokenizer if given.

There is deliberately no `config.json`: transformers would otherwise load the directory as the dense base with
randomly initialised MLPs and only a warning. Top-2 models can also be exported as Mixtral (`moe.mixtral`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from upcycle.errors import UserError
from upcycle.io import atomic_directory, read_json, write_json
from upcycle.moe.config import MoEConfig, UpcycleConfig
from upcycle.moe.upcycling import install_moe_layers

FORMAT = "upcycle-moe"
VERSION = 1
CONFIG_NAME = "moe_config.json"
WEIGHTS_NAME = "model.safetensors"


def save_moe_model(model: nn.Module, out: str | Path, moe: MoEConfig, moe_layers: list[int],
                   upcycle: UpcycleConfig | None = None, tokenizer=None) -> Path:
    """Write `model` (an upcycled HF causal LM) to `out` atomically."""
    from safetensors.torch import save_model

    meta = {"format": FORMAT, "version": VERSION, "base_config": model.config.to_dict(), "moe": moe.to_dict(),
            "moe_layers": list(moe_layers), "upcycle": None if upcycle is None else vars(upcycle)}
    with atomic_directory(out) as tmp:
        write_json(tmp / CONFIG_NAME, meta)
        save_model(model, str(tmp / WEIGHTS_NAME))  # de-duplicates tied embeddings
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def read_moe_meta(path: str | Path) -> dict:
    """The checked contents of a checkpoint's moe_config.json."""
    path = Path(path)
    if (path / "config.json").exists() and not (path / CONFIG_NAME).exists():
        raise UserError(f"{path} is a Hugging Face checkpoint, not an upcycle MoE one; load it with "
                        "transformers.AutoModelForCausalLM.from_pretrained")
    meta = read_json(path / CONFIG_NAME)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path / CONFIG_NAME} is not an upcycle MoE checkpoint of format version {VERSION}")
    return meta


def load_moe_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, MoEConfig, list[int]]:
    """Load a checkpoint written by `save_moe_model`: (model in eval mode, its MoE config, its MoE layer indices)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = read_moe_meta(path)
    moe = MoEConfig.from_dict(meta["moe"])
    base = dict(meta["base_config"])
    base_config = AutoConfig.for_model(base.pop("model_type"), **base)
    model = AutoModelForCausalLM.from_config(base_config)
    install_moe_layers(model, moe, meta["moe_layers"])
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False, device=device)
    except FileNotFoundError:
        raise UserError(f"{path / WEIGHTS_NAME} is missing; the checkpoint is incomplete") from None
    except RuntimeError as error:  # shape mismatch: the weights were written for another config
        first = str(error).strip().splitlines()[-1].strip()
        raise UserError(f"{path}: the weights do not fit {CONFIG_NAME} ({first})") from None
    if missing or unexpected:
        raise UserError(f"{path}: the weights do not fit {CONFIG_NAME} (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), moe, list(meta["moe_layers"])
