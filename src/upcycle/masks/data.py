"""Training and held-out blocks for mask training, from any corpus spec the data package understands."""

from __future__ import annotations

import random

import torch

from upcycle.data import SplitConfig, load_documents, split_documents
from upcycle.data.packing import pack, tokenize
from upcycle.errors import UserError

# Characters per token is ~3-4 for byte-level BPE on code and prose; reading 6 per wanted token leaves headroom
# while sparing us from tokenising a whole large corpus to train for a few hundred steps.
_CHARS_PER_TOKEN_BUDGET = 6


def _take(docs: list, tokens: int, seed: int) -> list[str]:
    """Texts of a seeded shuffle of `docs`, until about `tokens` tokens' worth of characters."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    texts, chars = [], 0
    for i in order:
        texts.append(docs[i].text)
        chars += len(docs[i].text)
        if chars >= tokens * _CHARS_PER_TOKEN_BUDGET:
            break
    return texts


def mask_blocks(tokenizer, data: str, splits: SplitConfig, block_size: int, train_tokens: int, eval_blocks: int,
                seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of `block_size` tokens per split: {'train', 'validation'[, 'test']: (inputs [N, L], labels [N, L])}.

    About `train_tokens` training tokens are read (the loop samples blocks from them); at most `eval_blocks` blocks
    are kept of each held-out split. Settings are chosen on 'validation'; 'test' (absent when the split is empty)
    is for the final numbers only.
    """
    parts = split_documents(load_documents(data), splits)
    if not parts["train"] or not parts["validation"]:
        raise UserError(f"--data {data}: too few documents for a training and a validation split")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks = {"train": pack(tokenize(tokenizer, _take(parts["train"], train_tokens, seed)), block_size, pad,
                            keep_remainder=False)}
    for split in ("validation", "test"):
        if parts[split]:
            inputs, labels = pack(tokenize(tokenizer, _take(parts[split], eval_blocks * block_size, seed)),
                                  block_size, pad)
            blocks[split] = (inputs[:eval_blocks], labels[:eval_blocks])
    if any(inputs.shape[0] == 0 for inputs, _ in blocks.values()):
        raise UserError(f"--data {data}: not enough text for one block of {block_size} tokens in each split")
    return blocks
