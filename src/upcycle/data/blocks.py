"""Corpus -> split -> tokenize -> pack: the token blocks that pretraining, the MoE and the mask experts train and
evaluate on.

A split's blocks are (inputs [N, L], labels [N, L]) int64, L = block_size. Training blocks are whole blocks only;
a held-out split keeps its last, padded block (its padded labels are IGNORE_INDEX), so that no held-out token is
lost. With a token budget, a seeded shuffle of the split's documents is read until about that many tokens' worth of
characters, so that a large corpus is not tokenised whole to train for a few hundred steps.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from upcycle.data.corpus import Document, load_documents
from upcycle.data.packing import pack, tokenize
from upcycle.data.splits import SplitConfig, split_documents
from upcycle.errors import UserError

Blocks = tuple[torch.Tensor, torch.Tensor]

# Characters per token is ~3-4 for byte-level BPE on code and prose; reading 6 per wanted token leaves headroom.
CHARS_PER_TOKEN_BUDGET = 6
_SPLIT_WORDS = {"train": "training", "validation": "validation", "test": "test"}


def corpus_splits(data: str, splits: SplitConfig = SplitConfig(), required: Sequence[str] = ("train",),
                  text_field: str = "text") -> dict[str, list[Document]]:
    """The documents of corpus `data` by split; a UserError when one of the `required` splits is empty."""
    parts = split_documents(load_documents(data, text_field=text_field), splits)
    if any(not parts[split] for split in required):
        raise UserError(f"--data {data}: too few documents for a "
                        f"{' and a '.join(_SPLIT_WORDS[split] for split in required)} split")
    return parts


def sample_texts(docs: Sequence[Document], tokens: int, seed: int = 0) -> list[str]:
    """Texts of a seeded shuffle of `docs`, until about `tokens` tokens' worth of characters."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    texts, chars = [], 0
    for i in order:
        texts.append(docs[i].text)
        chars += len(docs[i].text)
        if chars >= tokens * CHARS_PER_TOKEN_BUDGET:
            break
    return texts


def pack_texts(tokenizer, texts: Sequence[str], block_size: int, keep_remainder: bool = True) -> Blocks:
    """Each text tokenized with a closing EOS, all concatenated and cut into blocks (see `upcycle.data.packing`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack(tokenize(tokenizer, texts), block_size, pad, keep_remainder=keep_remainder)


def token_blocks(tokenizer, parts: dict[str, list[Document]], block_size: int,
                 splits: Sequence[str] = ("train", "validation"), train_tokens: int | None = None,
                 eval_blocks: int | None = None, seed: int = 0) -> dict[str, Blocks]:
    """Blocks of each of `splits` that has documents in `parts` (as `corpus_splits` returns them).

    train_tokens: read only about this many training tokens (a seeded sample of documents; None: all of them).
    eval_blocks: keep at most this many blocks of each held-out split, read from a seeded sample (None: all).
    """
    blocks = {}
    for split in splits:
        docs = parts[split]
        if not docs:
            continue
        budget = train_tokens if split == "train" else None if eval_blocks is None else eval_blocks * block_size
        texts = [d.text for d in docs] if budget is None else sample_texts(docs, budget, seed)
        inputs, labels = pack_texts(tokenizer, texts, block_size, keep_remainder=split != "train")
        blocks[split] = (inputs, labels) if split == "train" or eval_blocks is None else (
            inputs[:eval_blocks], labels[:eval_blocks])
    return blocks


def corpus_blocks(tokenizer, data: str, splits: SplitConfig, block_size: int,
                  names: Sequence[str] = ("train", "validation"), required: Sequence[str] = ("train",),
                  text_field: str = "text", train_tokens: int | None = None, eval_blocks: int | None = None,
                  seed: int = 0) -> dict[str, Blocks]:
    """`token_blocks` of corpus `data`: blocks of each of `names` that has documents, the `required` ones always.

    A UserError when a required split has no documents, or a split has too little text for one block.
    """
    parts = corpus_splits(data, splits, required, text_field)
    blocks = token_blocks(tokenizer, parts, block_size, names, train_tokens, eval_blocks, seed)
    if any(inputs.shape[0] == 0 for inputs, _ in blocks.values()):
        raise UserError(f"--data {data}: not enough text for one block of {block_size} tokens in each split")
    return blocks
