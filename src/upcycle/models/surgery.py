"""Model surgery as plain functions: find a Hugging Face decoder's SwiGLU FFNs and linear projections, swap modules.

Every method changes a base model through these: mask experts wrap its FFNs (`upcycle.masks.method.surgery`), sparse
upcycling replaces its MLPs by MoE layers (`upcycle.moe.upcycling`), serving wraps its projections with batched
LoRA (`upcycle.ops.batched_lora`). Nothing subclasses the HF model; modules are found by `named_modules` and swapped
by their dotted name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from upcycle.errors import UserError

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DECODER_MLP = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp$")


def is_swiglu_ffn(module: nn.Module) -> bool:
    """True for a dense Llama/Mistral/Qwen2-style MLP: Linear gate_proj, up_proj, down_proj and an act_fn.

    A module with a `router` (a mask-expert or compact layer that kept the projections) is routed, not dense."""
    return (all(isinstance(getattr(module, p, None), nn.Linear) for p in FFN_PROJECTIONS)
            and callable(getattr(module, "act_fn", None)) and not hasattr(module, "router"))


def find_ffns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every bias-free SwiGLU FFN in `model`, in module order; a UserError if there is none."""
    found = [(name, m) for name, m in model.named_modules() if is_swiglu_ffn(m)]
    if not found:
        raise UserError(f"{type(model).__name__} has no SwiGLU FFN (gate_proj, up_proj, down_proj, act_fn); "
                        "use a Llama-, Mistral- or Qwen2-style decoder")
    for name, m in found:
        if any(getattr(m, p).bias is not None for p in FFN_PROJECTIONS):
            raise UserError(f"{name}: FFNs with biases are not supported (mlp_bias must be false)")
    return found


def decoder_mlps(model: nn.Module) -> dict[int, str]:
    """Module name of each decoder layer's MLP (`...layers.<i>.mlp`, whatever it holds now), by layer index."""
    found = {int(m.group(1)): name for name, _ in model.named_modules() if (m := _DECODER_MLP.match(name))}
    return dict(sorted(found.items()))


def check_supported(model: nn.Module, action: str = "upcycle") -> None:
    """Raise a UserError unless `model` is a Llama / Mistral / Qwen2 causal LM with bias-free SwiGLU MLPs."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"cannot {action} a {model_type!r} model; supported bases: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "mlp_bias", False):
        raise UserError(f"cannot {action} a base whose MLPs have biases (mlp_bias=True); the experts are bias-free")


def matches_target(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's rule: a regex string must match the full module name; a list entry must equal it or be its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_linears(model: nn.Module, targets: str | Iterable[str] = ATTENTION_PROJECTIONS) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every `nn.Linear` whose name matches `targets` (PEFT's `target_modules` rule), in order."""
    targets = targets if isinstance(targets, str) else list(targets)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and matches_target(name, targets)]


def replace_module(model: nn.Module, name: str, module: nn.Module, keep_mode: bool = False) -> nn.Module | None:
    """Put `module` at dotted `name` in `model`; returns the module it replaced (None if there was none).

    keep_mode: give `module` the replaced module's train / eval mode (MoE layers behave differently in each)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if keep_mode and old is not None:
        module.train(old.training)
    setattr(parent, child, module)
    return old
