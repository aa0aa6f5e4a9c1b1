"""Read one PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) into plain tensors for the slots.

Only what serving needs and can honour: plain LoRA on `nn.Linear` layers. Anything else PEFT can save (DoRA, LoRA
bias, modules_to_save, embedding targets, fan_in_fan_out) is refused with an `AdapterError` naming the field, instead
of being served wrongly.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from upcycle.serving.errors import AdapterError

log = logging.getLogger(__name__)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
Buffer = bytearray | memoryview | mmap.mmap
"""Writable bytes that tensors can view (`torch.frombuffer`)."""


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


@dataclass(frozen=True)
class _Entry:
    """Where one tensor sits in a safetensors file's bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@dataclass
class AdapterWeights:
    """One adapter in CPU memory: the weights file's bytes and where each LoRA matrix sits in them.

    Loading makes almost no torch calls (so a background loader hardly competes with the serving thread for the
    GIL, which each torch call releases and re-takes); tensor views are made when the adapter is packed for the slots.
    """

    spec: AdapterSpec
    raw: bytearray | memoryview
    """The file's bytes (a view of the caller's buffer when read with `into=`)."""
    layout: dict[str, tuple[_Entry, _Entry, float]]
    """Full module name -> (A entry [r, I], B entry [O, r], scaling)."""

    @property
    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Full module name -> (A [r, I], B [O, r], scaling), as views of `raw`."""
        flat: dict[torch.dtype, torch.Tensor] = {}  # one view of the whole file per dtype, sliced per matrix

        def view(entry: _Entry) -> torch.Tensor:
            size = entry.dtype.itemsize
            if entry.begin % size or not math.prod(entry.shape):  # unaligned (a foreign writer) or empty
                return _tensor(self.raw, entry)
            if entry.dtype not in flat:
                flat[entry.dtype] = torch.frombuffer(self.raw, dtype=entry.dtype, count=len(self.raw) // size)
            # as_strided is one cheap op, where frombuffer + view per matrix is two (420 matrices in SmolLM2's)
            return flat[entry.dtype].as_strided(entry.shape, _contiguous_strides(entry.shape), entry.begin // size)

        return {name: (view(a), view(b), scaling) for name, (a, b, scaling) in self.layout.items()}

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Full module name -> (A shape, B shape), without touching the bytes."""
        return {name: (a.shape, b.shape) for name, (a, b, _) in self.layout.items()}

    @property
    def nbytes(self) -> int:
        return len(self.raw)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.layout.values())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _tensor(raw: Buffer, entry: _Entry) -> torch.Tensor:
    """The tensor `entry` describes, as a view of the file bytes `raw` (no copy)."""
    count = math.prod(entry.shape)
    if not count:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(raw, dtype=entry.dtype, count=count, offset=entry.begin).view(entry.shape)


def read_spec(path: str | Path) -> AdapterSpec:
    """Parse and check `path/adapter_config.json`, or raise an AdapterError saying what is wrong."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {CONFIG_NAME}") from None
    except RecursionError:  # json's C parser recurses once per nesting level
        raise AdapterError(f"{path / CONFIG_NAME} is unreadable: nested too deeply") from None
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
        spec = AdapterSpec(target_modules=targets if isinstance(targets, str) else tuple(map(str, targets)),
                           rank=max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())]),
                           lora_alpha=float(config.get("lora_alpha", 8)),
                           use_rslora=bool(config.get("use_rslora", False)),
                           alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                           base_model=config.get("base_model_name_or_path"))
        # Patterns are compiled here so a bad one is this adapter's error, not a crash where it is first matched.
        for pattern in [*spec.alpha_pattern, *([spec.target_modules] if isinstance(targets, str) else [])]:
            re.compile(pattern)
    except (KeyError, TypeError, ValueError, AttributeError, re.error) as error:
        raise AdapterError(f"{path / CONFIG_NAME} has a bad field: {error!r}") from None
    if spec.rank < 1 or not math.isfinite(spec.lora_alpha) or not all(map(math.isfinite, spec.alpha_pattern.values())):
        raise AdapterError(f"{path / CONFIG_NAME}: r must be >= 1 and lora_alpha finite (r={spec.rank}, "
                           f"lora_alpha={spec.lora_alpha})")
    return spec


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_buffer(nbytes: int) -> mmap.mmap:
    """Memory to read adapter files into again and again (`read_adapter(..., into=)`): an anonymous mapping.

    A fresh `bytearray` per file costs the first touch of its pages whenever the allocator hands out new ones, and
    on this project's 2-core VM a file read into a glibc-mmapped bytearray measured 5-7 ms per 9.8 MB, reused or not,
    against 1.6-2 ms into an anonymous mapping (or a heap block, which glibc may or may not choose)."""
    return mmap.mmap(-1, max(nbytes, 1))


def _read_raw(path: Path, into: Buffer | None = None) -> tuple[Buffer, _Header]:
    """A safetensors file's bytes (one read, into `into` when it is large enough) and its checked header, in plain
    Python.

    The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    bytes. Raises ValueError on a malformed file, OSError when unreadable.
    """
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = memoryview(into)[:size] if into is not None and len(into) >= size else bytearray(size)
        if handle.readinto(buffer) != size:
            raise ValueError("short read")
    if size < 8:
        raise ValueError("file too short for a safetensors header")
    header_len = int.from_bytes(buffer[:8], "little")
    if header_len > size - 8:
        raise ValueError(f"header length {header_len} exceeds the file")
    return buffer, _parse_header(bytes(buffer[8: 8 + header_len]), size - 8 - header_len)


@dataclass(frozen=True, eq=False)
class _Header:
    """A parsed and checked safetensors header, shared by every file whose header is the same bytes (see
    `_parse_header`), so what follows from the header alone is worked out once."""

    entries: Mapping[str, _Entry]
    """Tensor name -> where it sits (read-only: the object is shared)."""

    @functools.cached_property
    def lora_pairs(self) -> dict[str, tuple[_Entry, _Entry]]:
        """PEFT module name -> (lora_A entry, lora_B entry); raises ValueError saying why the tensors are not a
        plain LoRA's."""
        found: dict[str, dict[str, _Entry]] = {}
        for key, entry in self.entries.items():
            match = _KEY.match(key.removeprefix(_PREFIX))
            if match is None:
                raise ValueError(f"unexpected tensor {key!r} (only lora_A/lora_B weights)")
            found.setdefault(match["module"], {})[match["which"]] = entry
        if not found:
            raise ValueError("holds no LoRA weights")
        pairs = {}
        for module, pair in found.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{module} lacks lora_{'B' if 'A' in pair else 'A'}")
            a, b = pair["A"], pair["B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{module} has mismatched shapes A {a.shape}, B {b.shape}")
            if a.shape[0] == 0:
                raise ValueError(f"{module} has rank 0 (A {a.shape}, B {b.shape})")
            pairs[module] = (a, b)
        return pairs

    @functools.cached_property
    def ordered(self) -> tuple[_Entry, ...]:
        """The entries by position in the file."""
        return tuple(sorted(self.entries.values(), key=lambda e: e.begin))

    @functools.cached_property
    def one_region(self) -> tuple[int, int, torch.dtype] | None:
        """(first byte, end, dtype) when the tensors tile the data in one dtype without gaps, else None."""
        ordered = self.ordered
        if not ordered or len({e.dtype for e in ordered}) != 1:
            return None
        if any(x.end != y.begin for x, y in zip(ordered, ordered[1:], strict=False)):
            return None
        return ordered[0].begin, ordered[-1].end, ordered[0].dtype


@functools.lru_cache(maxsize=16)
def _parse_header(header: bytes, body: int) -> _Header:
    """The checked entries of a JSON header followed by a `body`-byte data region.

    Cached by the header's bytes: the experts of one base and recipe share one header byte for byte, and parsing,
    checking and pairing its 420 entries (SmolLM2's adapter) took about 3 of the 7.4 ms `read_adapter` spent on a
    9.8 MB file, in Python, holding the GIL the serving thread needs."""
    try:
        parsed = json.loads(header)
    except RecursionError:  # json's C parser recurses once per nesting level
        raise ValueError("header is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ValueError("header is not a JSON object")
    start = 8 + len(header)
    return _Header(MappingProxyType({name: _header_entry(name, info, start, body) for name, info in parsed.items()
                                     if name != "__metadata__"}))


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (bool is an int in Python, but not in a header)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(name: str, info: object, start: int, body: int) -> _Entry:
    """One header entry {dtype, shape, data_offsets}, checked against a `body`-byte data region at `start`."""
    if not isinstance(info, dict):
        raise ValueError(f"{name}: header entry is a {type(info).__name__}, not an object")
    dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise ValueError(f"{name}: unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise ValueError(f"{name}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise ValueError(f"{name}: data_offsets {offsets!r} is not two non-negative integers")
    begin, end = offsets
    if not begin <= end <= body or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{name}: data offsets {begin}..{end} do not fit shape {shape} in a {body}-byte body")
    return _Entry(dtype, tuple(shape), start + begin, start + end)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, as views of one buffer filled by a single read.

    A LoRA file holds dozens of small tensors, where `safetensors.torch.load_file` spends its time per tensor; this
    reader is several times faster on them (tests check it returns the same tensors).
    """
    buffer, header = _read_raw(Path(path))
    return {name: _tensor(buffer, entry) for name, entry in header.entries.items()}


def read_adapter(path: str | Path, into: Buffer | None = None) -> AdapterWeights:
    """Load a PEFT LoRA directory into CPU memory, or raise an AdapterError (corrupt or unsupported).

    `into`: memory to read the weights file into when it is large enough (see `read_buffer`), else a new buffer is
    used. The returned weights are views of it: be done with them (e.g. packed) before reusing it.

    The files may come from anyone who can write to an expert directory, so nothing else may escape: a reader bug
    on a hostile file must fail that adapter, never the thread that asked for it.
    """
    try:
        return _read_adapter(Path(path), into)
    except AdapterError:
        raise
    except Exception as error:
        log.warning("reading the adapter %s failed unexpectedly", path, exc_info=True)
        raise AdapterError(f"{path} is unreadable: {type(error).__name__}: {error}") from None


def _read_adapter(path: Path, into: Buffer | None) -> AdapterWeights:
    spec = read_spec(path)
    try:
        raw, header = _read_raw(path / WEIGHTS_NAME, into)
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AdapterError(f"{path / WEIGHTS_NAME} is corrupt: {error}") from None
    try:
        pairs = header.lora_pairs
    except ValueError as error:
        raise AdapterError(f"{path / WEIGHTS_NAME}: {error}") from None
    layout = {module: (a, b, spec.scaling(module, a.shape[0])) for module, (a, b) in pairs.items()}
    _check_finite(path, raw, header)
    return AdapterWeights(spec=spec, raw=raw, layout=layout)


def _check_finite(path: Path, raw: Buffer, header: _Header) -> None:
    """Refuse NaN / inf weights: one check over the whole data region when the tensors tile it in one dtype.

    The one check is a sum: NaN and inf propagate through a sum, so a finite sum proves every element finite, and it
    costs a twenty-fifth of an elementwise isfinite (0.23 against 6.3 ms on a 9.8 MB fp32 adapter). A sum that is
    not finite (a NaN or inf somewhere, or finite weights whose sum overflows) falls through to the elementwise
    check, which decides and names the tensor.
    """
    if header.one_region is not None:
        start, end, dtype = header.one_region
        if end == start:
            return
        region = torch.frombuffer(raw, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)
        if torch.isfinite(region.sum()):
            return
    for entry in header.ordered:  # the slow path: mixed layouts, or naming the culprit
        if not _tensor(raw, entry).isfinite().all():
            raise AdapterError(f"{path / WEIGHTS_NAME}: the tensor at bytes {entry.begin}..{entry.end} holds NaN "
                               "or inf")
