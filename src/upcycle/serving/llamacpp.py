"""llama.cpp as a serving peer: our Hugging Face Llama directory as a GGUF, our PEFT adapters as GGUF LoRA adapters.

Written with the `gguf` package's own `GGUFWriter`, `TensorNameMap` and vocabulary readers, the pieces llama.cpp's
`convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` are built from, for the one architecture upcycle serves
(Llama): the hyper-parameters, the byte-level BPE vocabulary, and the tensors renamed one by one, with the query and
key rows reordered for llama.cpp's rotary layout (HF keeps the two rotary halves apart; GGUF interleaves them).

Running the model needs the optional extra (`pip install 'upcycle[llamacpp]'`, i.e. llama-cpp-python, which compiles
llama.cpp: about 45 minutes on 2 cores). Converting needs only `gguf`.

Scaling: PEFT's per-module scaling (alpha / r, rsLoRA's alpha / sqrt(r), alpha_pattern) is folded into B and the
adapter's `adapter.lora.alpha` is written as 0, which llama.cpp reads as "scale 1", so every rule PEFT has is honoured
without llama.cpp knowing it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from upcycle.errors import UserError

EXTRA = "pip install 'upcycle[llamacpp]' (llama-cpp-python; it compiles llama.cpp, about 45 min on 2 cores)"
_ROTARY = {"q_proj": "heads", "k_proj": "kv_heads"}  # projections whose output rows llama.cpp reorders


def require_llama_cpp():
    """The `llama_cpp` module, or a UserError saying how to install the extra (checked before any import)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"the llama.cpp peer needs the llamacpp extra, which is not installed: {EXTRA}")
    import llama_cpp

    return llama_cpp


def rotary_permute(rows, n_head: int):
    """Reorder the output rows [O, ...] of a q/k projection from HF's rotary layout to llama.cpp's.

    Per head, HF's rows are (first halves of all pairs, second halves); GGUF's are the pairs interleaved.
    """
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _config(hf_dir: Path) -> dict:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise UserError(f"{hf_dir}: model_type {config.get('model_type')!r}; the GGUF converter handles Llama only")
    return config


def _head_counts(config: dict) -> dict[str, int]:
    heads = config["num_attention_heads"]
    return {"heads": heads, "kv_heads": config.get("num_key_value_heads") or heads}


@contextmanager
def _writer(out: Path) -> Iterator:
    """A GGUFWriter for the Llama architecture whose file appears at `out` only when complete."""
    from gguf import GGUFWriter

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(tmp, "llama")
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _tensor_names(config: dict):
    from gguf import MODEL_ARCH, get_tensor_name_map

    return get_tensor_name_map(MODEL_ARCH.LLAMA, config["num_hidden_layers"])


def _gguf_name(names, hf_name: str) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"no GGUF name for the tensor {hf_name!r}; the converter handles plain Llama models only")
    return name


def _add_hparams(writer, config: dict, name: str) -> None:
    from gguf import LlamaFileType

    heads = _head_counts(config)
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads["heads"])
    writer.add_head_count_kv(heads["kv_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads["heads"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(LlamaFileType.ALL_F32)


def _add_vocab(writer, hf_dir: Path, n_vocab: int) -> None:
    """The byte-level BPE vocabulary, padded with unused tokens up to the model's embedding rows (llama.cpp needs one
    token per row; random-weight benchmark models have more rows than their tokenizer has tokens)."""
    from gguf import BpeVocab, SpecialVocab, TokenType

    vocab = BpeVocab(hf_dir)
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text if isinstance(text, bytes) else text.encode())
        types.append(kind)
    if len(tokens) > n_vocab:
        raise UserError(f"{hf_dir}: the tokenizer has {len(tokens)} tokens but the model only {n_vocab} embeddings")
    tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), n_vocab)]
    types += [TokenType.UNUSED] * (n_vocab - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(hf_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


def convert_base(hf_dir: str | Path, out: str | Path) -> Path:
    """Write the Llama model in `hf_dir` (safetensors) as an F32 GGUF at `out`; returns `out`."""
    from safetensors.numpy import load_file

    hf_dir = Path(hf_dir)
    config = _config(hf_dir)
    names, heads = _tensor_names(config), _head_counts(config)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no .safetensors weights to convert")
    with _writer(Path(out)) as writer:
        _add_hparams(writer, config, hf_dir.name)
        _add_vocab(writer, hf_dir, config["vocab_size"])
        for file in files:
            for hf_name, array in load_file(file).items():
                if "rotary_emb" in hf_name:
                    continue
                projection = hf_name.split(".")[-2]
                if projection in _ROTARY:
                    array = rotary_permute(array, heads[_ROTARY[projection]])
                writer.add_tensor(_gguf_name(names, hf_name), array.astype("float32"))
    return Path(out)


def convert_adapter(adapter_dir: str | Path, hf_dir: str | Path, out: str | Path) -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir`, trained on the Llama model in `hf_dir`, as a GGUF LoRA at `out`."""
    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.errors import AdapterError

    config = _config(Path(hf_dir))
    names, heads = _tensor_names(config), _head_counts(config)
    try:
        weights = read_adapter(adapter_dir)
    except AdapterError as error:
        raise UserError(str(error)) from None
    with _writer(Path(out)) as writer:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 0.0)  # 0: llama.cpp applies scale 1; PEFT's scaling is in B
        for module, (a, b, scaling) in weights.modules.items():
            hf_name = module.removeprefix("base_model.model.")
            b = b.float().numpy() * scaling  # [O, r]
            if hf_name.split(".")[-1] in _ROTARY:
                b = rotary_permute(b, heads[_ROTARY[hf_name.split(".")[-1]]])
            name = _gguf_name(names, hf_name + ".weight")
            writer.add_tensor(f"{name}.lora_a", a.float().numpy().copy())  # [r, I]
            writer.add_tensor(f"{name}.lora_b", b.astype("float32"))
    return Path(out)


def _read(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as error:  # gguf raises ValueError/IndexError/... on truncated or foreign files
        raise UserError(f"{path}: not a readable GGUF file ({type(error).__name__})") from None


def _architecture(reader) -> str | None:
    field = reader.fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def check_lora_for_base(base_gguf: str | Path, lora_gguf: str | Path) -> None:
    """UserError unless every matrix of the GGUF LoRA at `lora_gguf` fits a weight of the GGUF model `base_gguf`.

    llama.cpp itself checks this only when it loads the adapter, and answers with a log line and a null pointer.
    """
    base, lora = _read(Path(base_gguf)), _read(Path(lora_gguf))
    if _architecture(lora) != _architecture(base):
        raise UserError(f"{lora_gguf}: a LoRA for architecture {_architecture(lora)!r}, but the base is "
                        f"{_architecture(base)!r}; convert the adapter trained on this base")
    weights = {t.name: [int(n) for n in t.shape] for t in base.tensors}  # GGUF order: [in, out]
    pairs = [t for t in lora.tensors if t.name.endswith((".lora_a", ".lora_b"))]
    if not pairs:
        raise UserError(f"{lora_gguf}: no .lora_a / .lora_b tensors; not a GGUF LoRA adapter")
    for tensor in pairs:
        target, shape = tensor.name[: -len(".lora_a")], [int(n) for n in tensor.shape]
        side = 0 if tensor.name.endswith(".lora_a") else 1  # A reads the weight's input, B writes its output
        if target not in weights or shape[side] != weights[target][side]:
            have = weights.get(target)
            raise UserError(f"{lora_gguf}: a LoRA for another base: {tensor.name} has shape {shape} but the base "
                            f"{'has no ' + target if have is None else f'{target} is {have}'}; convert the adapter "
                            "trained on this base")


class LlamaCppPeer:
    """One llama.cpp model and context (llama-cpp-python) with GGUF LoRA adapters switched per request.

    llama.cpp applies a context's adapters to every sequence in it, so requests for different experts cannot share a
    batch: each runs alone after the context's adapter is switched, as llama-server serves mixed-LoRA traffic.
    """

    def __init__(self, model_path: str | Path, loras: dict[str, Path] | None = None, n_ctx: int = 512,
                 n_threads: int = 1) -> None:
        self._api = require_llama_cpp()
        self.model_path = Path(model_path)
        self.llm = self._api.Llama(str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False)
        self.adapters: dict[str, object] = {}
        self.current: str | None = None
        for name, path in (loras or {}).items():
            self.add(name, path)

    def add(self, name: str, path: str | Path) -> None:
        """Load the GGUF LoRA at `path` as adapter `name`, after checking that it fits this base."""
        check_lora_for_base(self.model_path, path)
        adapter = self._api.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not adapter:
            raise UserError(f"{path}: llama.cpp could not load the LoRA adapter (see its log)")
        self.adapters[name] = adapter

    def use(self, name: str | None) -> None:
        """Make `name` (None: no adapter) the context's only adapter."""
        if name == self.current:
            return
        if name is None:
            status = self._api.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            import ctypes

            adapters = (self._api.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            status = self._api.llama_set_adapters_lora(self.llm.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if status != 0:
            raise RuntimeError(f"llama_set_adapters_lora failed ({status}) for adapter {name!r}")
        self.current = name

    def generate(self, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
        """`max_tokens` greedy tokens after `prompt` under `adapter` (EOS ignored, no prompt cache reuse)."""
        self.use(adapter)
        self.llm.reset()  # no prefix reuse: its cached keys may come from another adapter
        out: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, reset=True):
            out.append(int(token))
            if len(out) == max_tokens:
                break
        return out

    def close(self) -> None:
        self.use(None)
        for adapter in self.adapters.values():
            self._api.llama_adapter_lora_free(adapter)
        self.adapters.clear()
        self.llm.close()
