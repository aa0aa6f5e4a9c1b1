"""Tokenise documents and pack them into fixed-length blocks for causal language modelling."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # label value that Hugging Face losses skip


def tokenize(tokenizer, texts: Sequence[str], add_eos: bool = True) -> list[list[int]]:
    """Token ids of each text (no special tokens but a trailing EOS, which marks the document boundary)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        ids = [seq + [tokenizer.eos_token_id] for seq in ids]
    return ids


def pack(token_lists: Sequence[Sequence[int]], block_size: int, pad_id: int = 0,
         keep_remainder: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the token lists and cut them into blocks of `block_size`.

    Returns `(input_ids, labels)`, both [N, block_size] int64. The last, shorter block is padded with `pad_id`
    and its padded labels are IGNORE_INDEX when `keep_remainder`, else dropped. Labels equal inputs elsewhere:
    Hugging Face causal LMs shift them internally.
    """
    flat = torch.tensor([t for seq in token_lists for t in seq], dtype=torch.long)
    n_full, rest = divmod(flat.numel(), block_size)
    inputs = flat[: n_full * block_size].view(n_full, block_size)
    labels = inputs.clone()
    if keep_remainder and rest > 1:  # one token alone predicts nothing
        tail = torch.full((1, block_size), pad_id, dtype=torch.long)
        tail[0, :rest] = flat[n_full * block_size:]
        tail_labels = torch.full((1, block_size), IGNORE_INDEX, dtype=torch.long)
        tail_labels[0, :rest] = flat[n_full * block_size:]
        inputs, labels = torch.cat([inputs, tail]), torch.cat([labels, tail_labels])
    return inputs, labels
