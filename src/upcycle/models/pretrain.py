"""The recipe that builds the embedded default base: a tiny Llama trained from scratch on a corpus.

`upcycle pretrain` trains a byte-level BPE tokenizer and a small Llama-architecture causal LM on the training split,
evaluates on the validation split as it goes, and saves a Hugging Face directory (config, safetensors, tokenizer)
plus `pretrain.json` (the exact settings, seed, Python version, loss curve, held-out perplexity and the weights'
content hash) and `loss_curve.png`. The run is resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from upcycle.data.blocks import corpus_splits, token_blocks
from upcycle.io import atomic_directory, ensure_writable_dir, sha256_file, write_json
from upcycle.models.config import PretrainConfig, TinyLlamaShape
from upcycle.training.loop import is_main_process, train

log = logging.getLogger(__name__)


def build_model(shape: TinyLlamaShape, tokenizer, seed: int):
    """A freshly initialised LlamaForCausalLM of the given shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**asdict(shape) | {"vocab_size": len(tokenizer)},
                         num_key_value_heads=shape.num_attention_heads,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def pretrain(config: PretrainConfig, out: str | Path) -> dict | None:
    """Run the recipe and save the model to `out`. Returns the summary also written to `out/pretrain.json`."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from upcycle.models.tokenizer import train_bpe_tokenizer

    out = Path(out)
    work = ensure_writable_dir(out.parent / f".{out.name}.work")
    splits = corpus_splits(config.data, config.splits, required=("train", "validation"))

    tokenizer_dir = work / "tokenizer"
    with PartialState().main_process_first():  # under DDP rank 0 trains the tokenizer, the others load it
        if not (tokenizer_dir / "tokenizer.json").exists():
            tokenizer = train_bpe_tokenizer((d.text for d in splits["train"]), config.shape.vocab_size)
            with atomic_directory(tokenizer_dir) as tmp:
                tokenizer.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    blocks = token_blocks(tokenizer, splits, config.block_size)
    train_blocks, val_blocks = blocks["train"], blocks["validation"]
    val_blocks = tuple(t[torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(0))] for t in val_blocks)
    log.info("pretraining on %d blocks of %d tokens", train_blocks[0].shape[0], config.block_size)

    model = build_model(config.shape, tokenizer, config.train.seed)
    result = train(model, train_blocks, config.train, eval_blocks=val_blocks, checkpoint_dir=work,
                   description="pretrain")
    final = result.evals[-1]
    if not is_main_process():  # under DDP every rank holds the same weights; rank 0 saves them
        return None
    summary = {
        "command": " ".join(sys.argv),
        "config": asdict(config),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": result.tokens,
        "train_seconds": result.seconds,
        "validation_loss": final["loss"],
        "validation_perplexity": final["perplexity"],
        "eval_curve": result.evals,
        "train_curve": result.history[:: max(1, len(result.history) // 200)],
    }
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        summary["weights_sha256"] = sha256_file(tmp / "model.safetensors")
        write_json(tmp / "pretrain.json", summary)
        plot_loss_curve(summary, tmp / "loss_curve.png")
    shutil.rmtree(work, ignore_errors=True)  # the resume state is obsolete once the model is saved
    log.info("saved %s: validation perplexity %.2f", out, final["perplexity"])
    return summary


def plot_loss_curve(summary: dict, path: Path) -> None:
    """Training loss and held-out loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = summary["train_tokens"] / max(1, summary["eval_curve"][-1]["step"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] * tokens_per_step / 1e6 for r in summary["train_curve"]],
            [r["loss"] for r in summary["train_curve"]], label="train (batch)", alpha=0.5)
    ax.plot([r["step"] * tokens_per_step / 1e6 for r in summary["eval_curve"]],
            [r["loss"] for r in summary["eval_curve"]], "o-", label="validation")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"tiny base: validation ppl {math.exp(summary['validation_loss']):.1f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
