"""Read one PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) into plain tensors for the slots.

Only what serving needs and can honour: plain LoRA on `nn.Linear` layers. Anything else PEFT can save (DoRA, LoRA
bias, modules_to_save, embedding targets, fan_in_fan_out) is refused with an `AdapterError` naming the field, instead
of being served wrongly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.serving.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter_config.json says, checked; enough to decide whether the serving model can hold the adapter."""

    target_modules: str | tuple[str, ...]
    """PEFT's target_modules: a regex (str) or module-name suffixes."""
    rank: int
    """The largest rank used (r, or the maximum of rank_pattern)."""
    lora_alpha: float
    use_rslora: bool
    alpha_pattern: dict[str, float]
    base_model: str | None
    """base_model_name_or_path as saved, for the caller to compare with the served base."""

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling for `module` at `rank`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        alpha = self.lora_alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
                break
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass
class AdapterWeights:
    """One adapter in memory, ready to copy into a slot."""

    spec: AdapterSpec
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    """Full module name -> (A [r, I], B [O, r], scaling); scaling is 1.0 when it was folded into B."""

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def read_spec(path: str | Path) -> AdapterSpec:
    """Parse and check `path/adapter_config.json`, or raise an AdapterError saying what is wrong."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {CONFIG_NAME}") from None
    except (OSError, ValueError) as error:
        raise AdapterError(f"{path / CONFIG_NAME} is unreadable: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path / CONFIG_NAME} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')} adapter; only LoRA is served")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save"):
        if config.get(flag):
            raise AdapterError(f"{path}: {flag}={config[flag]!r} is not supported by the multi-adapter server")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} is not supported by the multi-adapter server")
    targets = config.get("target_modules")
    if not targets:
        raise AdapterError(f"{path / CONFIG_NAME} has no target_modules")
    try:
        rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
        return AdapterSpec(target_modules=targets if isinstance(targets, str) else tuple(targets), rank=rank,
                           lora_alpha=float(config.get("lora_alpha", 8)),
                           use_rslora=bool(config.get("use_rslora", False)),
                           alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                           base_model=config.get("base_model_name_or_path"))
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{path / CONFIG_NAME} has a bad field: {error!r}") from None


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, as views of one buffer filled by a single read.

    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    bytes. A LoRA file holds dozens of small tensors, where `safetensors.torch.load_file` spends its time per tensor;
    this reader is several times faster on them (tests check it returns the same tensors). Raises ValueError on a
    malformed file, OSError when unreadable.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        size = path.stat().st_size
        buffer = bytearray(size)
        if handle.readinto(buffer) != size:
            raise ValueError("short read")
    if size < 8:
        raise ValueError("file too short for a safetensors header")
    header_len = int.from_bytes(buffer[:8], "little")
    if header_len > size - 8:
        raise ValueError(f"header length {header_len} exceeds the file")
    header = json.loads(bytes(buffer[8: 8 + header_len]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    start, body = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{name}: unsupported dtype {info.get('dtype')!r}")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        count = math.prod(shape)
        if not 0 <= begin <= end <= body or end - begin != count * dtype.itemsize:
            raise ValueError(f"{name}: data offsets {begin}..{end} do not fit shape {shape} in a {body}-byte body")
        tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=start + begin).view(shape) \
            if count else torch.empty(shape, dtype=dtype)
    return tensors


def read_adapter(path: str | Path, dtype: torch.dtype = torch.float32, pin_memory: bool = False,
                 fold_scaling: bool = True) -> AdapterWeights:
    """Load a PEFT LoRA directory into CPU tensors of `dtype`, or raise an AdapterError (corrupt or unsupported).

    With `fold_scaling` each B comes back already multiplied by its scaling (and the scaling reported as 1.0), so
    copying it into a slot later (on the serving thread) is a plain copy; the disk read pays for the multiply.
    """
    path = Path(path)
    spec = read_spec(path)
    try:
        tensors = read_safetensors(path / WEIGHTS_NAME)
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AdapterError(f"{path / WEIGHTS_NAME} is corrupt: {error}") from None
    _check_finite(path, tensors)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise AdapterError(f"{path / WEIGHTS_NAME}: unexpected tensor {key!r} (only lora_A/lora_B weights)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{path / WEIGHTS_NAME} holds no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path / WEIGHTS_NAME}: {module} lacks lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{path / WEIGHTS_NAME}: {module} has mismatched shapes A {tuple(a.shape)}, "
                               f"B {tuple(b.shape)}")
        scaling = spec.scaling(module, a.shape[0])
        a = a.to(dtype).contiguous()
        b = (b.to(dtype) * scaling).contiguous() if fold_scaling else b.to(dtype).contiguous()
        if pin_memory:  # page-locked, so the copy into accelerator slots can run asynchronously
            a, b = a.pin_memory(), b.pin_memory()
        modules[module] = (a, b, 1.0 if fold_scaling else scaling)
    return AdapterWeights(spec=spec, modules=modules)


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN / inf weights: one check over all values (a few small tensors' worth of work)."""
    values = [t.reshape(-1).float() for t in tensors.values()]
    if values and not torch.isfinite(torch.cat(values)).all():
        bad = next(name for name, t in tensors.items() if not torch.isfinite(t).all())
        raise AdapterError(f"{path / WEIGHTS_NAME}: {bad} holds NaN or inf")
