"""Load a Hugging Face causal LM (a local directory or a hub id) as the frozen base of an upcycled model."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from upcycle.errors import UserError

DEFAULT_BASE_NAME = "tiny-stdlib"
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def default_base_dir() -> Path:
    """The shipped tiny Llama trained by `upcycle pretrain` on the standard library."""
    return Path(str(resources.files("upcycle") / "models" / "assets" / DEFAULT_BASE_NAME))


def resolve_base(base: str | None) -> str:
    """The local directory or hub id to load for `base`.

    None / 'default' give the shipped tiny Llama; a GGUF base ('smollm2-135m', 'gguf:FILE') gives its cached
    Hugging Face directory, converted on first use (upcycle.models.gguf); local paths are made absolute.
    """
    from upcycle.models.gguf import is_gguf_spec, resolve_gguf_base

    if base and is_gguf_spec(base):
        return resolve_gguf_base(base)
    if base in (None, "", "default", DEFAULT_BASE_NAME):
        path = default_base_dir()
        if not (path / "config.json").is_file():
            raise UserError(f"the shipped base model is missing at {path}; rebuild it with `upcycle pretrain --out "
                            f"{path}` or pass --base")
        return str(path)
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--base {base}: no config.json there; give a Hugging Face model directory, a hub id, "
                            "'smollm2-135m' or 'gguf:FILE'")
        return str(path.resolve())
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise UserError(f"--base {base}: no such directory")
    return base  # a hub id; loading says whether it is cached or reachable


def load_tokenizer(base: str):
    """The base's tokenizer, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as error:
        raise UserError(f"--base {base}: cannot load its tokenizer ({str(error).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base: str | None = None, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) for a causal LM directory or hub id, in eval mode, on `device` (CUDA when available)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = resolve_base(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise UserError(f"--base {base}: cannot load as a causal LM ({str(error).splitlines()[0]})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), load_tokenizer(base)


def base_fingerprint(base: str) -> str:
    """A cheap identity of a local base: sha256 over config.json and the first 4 MiB of each weights file.

    It tells adapters trained on another base apart without hashing gigabytes. Hub ids hash their name.
    """
    path = Path(base)
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(base.encode())
        return digest.hexdigest()[:16]
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        with open(weights, "rb") as handle:
            digest.update(handle.read(4 << 20))
    return digest.hexdigest()[:16]
