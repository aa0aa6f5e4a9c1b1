"""The mask run directory: the contract between `upcycle masks train`, `analyze` and `sweep`.

```
RUN/
  masks.json          format, settings, the base (path + fingerprint + shape), data, training curve, evaluation
  masks.safetensors   the masks alone: each masked FFN's router weight and gate log α, keyed as in the model
  analysis.json       expert kinds and neuron usage over held-out tokens (upcycle.masks.method.analysis)
  analysis.md         the same per layer as a table; experts.png: the same as plots
  compact/            the compacted model (upcycle.masks.method.export; load with load_compact)
  .work/              resumable training state (the loop's checkpoint and the Lagrange multipliers)
```
Masks only make sense on the base they were trained on: loading them checks the base's fingerprint and shapes.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from upcycle.errors import UserError
from upcycle.io import atomic_write_bytes, read_json, write_json
from upcycle.masks.config import MaskConfig
from upcycle.masks.method.surgery import add_masks, load_mask_state, mask_state_dict

RUN_FORMAT = 1
META = "masks.json"
WEIGHTS = "masks.safetensors"
ANALYSIS = "analysis.json"
ANALYSIS_TABLE = "analysis.md"
EXPERTS_PLOT = "experts.png"
COMPACT = "compact"
WORK = ".work"


def base_identity(base: str, model: nn.Module) -> dict:
    """What identifies the base the masks belong to."""
    from upcycle.models.base import base_fingerprint

    config = model.config
    return {"path": base, "fingerprint": base_fingerprint(base), "model_type": config.model_type,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers}


def save_masks(run: str | Path, model: nn.Module, meta: dict) -> None:
    """Write the masks' tensors and `meta` (which must hold 'base' and 'masks') into `run`."""
    from safetensors.torch import save

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    state = mask_state_dict(model, ffn=trains_ffn(meta))
    atomic_write_bytes(run / WEIGHTS, save({k: v.contiguous().cpu() for k, v in state.items()}))
    write_meta(run, meta)


def trains_ffn(meta: dict) -> bool:
    """Whether the run fine-tuned the FFN weights with its masks (then masks.safetensors holds them too)."""
    return meta.get("config", {}).get("ffn_lr") is not None


def write_meta(run: str | Path, meta: dict) -> None:
    """(Re)write masks.json."""
    write_json(Path(run) / META, {"format": RUN_FORMAT, **{k: v for k, v in meta.items() if k != "format"}})


def read_meta(run: str | Path) -> dict:
    """masks.json of a run, or a UserError saying the directory is not a finished mask run."""
    path = Path(run) / META
    if not path.exists():
        raise UserError(f"{run} is not a mask run (no {META}); create one with `upcycle masks train`")
    meta = read_json(path)
    if meta.get("format") != RUN_FORMAT:
        raise UserError(f"{path}: run format {meta.get('format')} is not supported (expected {RUN_FORMAT})")
    return meta


def apply_masks(run: str | Path, model: nn.Module, base: str) -> dict:
    """Add the run's masks to `model` (loaded from `base`), refusing masks trained on another base."""
    from safetensors.torch import load_file

    from upcycle.models.base import base_fingerprint

    meta = read_meta(run)
    trained_on = meta["base"]
    fingerprint = base_fingerprint(base)
    if fingerprint != trained_on["fingerprint"]:
        raise UserError(f"the masks in {run} were trained on {trained_on['path']} (fingerprint "
                        f"{trained_on['fingerprint']}), not on {base} ({fingerprint}); pass the base they belong to")
    add_masks(model, MaskConfig(**meta["masks"]))
    state = load_file(str(Path(run) / WEIGHTS))
    load_mask_state(model, state, source=f"the masks in {run}", ffn=trains_ffn(meta))
    return meta
