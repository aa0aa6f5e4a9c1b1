"""CLI command that rebuilds the embedded tiny base."""

from __future__ import annotations

from upcycle.models.config import PretrainConfig


def pretrain(out: str = "runs/tiny-base", recipe: PretrainConfig = PretrainConfig()) -> None:
    """Train the tiny Llama base (tokenizer + model) from scratch on a corpus; resumable.

    The defaults rebuild the shipped base: `upcycle pretrain --out DIR`.

    Args:
        out: Output directory (a Hugging Face model directory).
        recipe: Data, architecture and optimisation settings.
    """
    from upcycle.models.pretrain import pretrain as run

    summary = run(recipe, out)
    if summary is None:  # a rank other than 0 under DDP: rank 0 saved and reports
        return
    print(f"{out}: {summary['parameters']} parameters, {summary['train_tokens']} tokens, validation perplexity "
          f"{summary['validation_perplexity']:.2f}")
