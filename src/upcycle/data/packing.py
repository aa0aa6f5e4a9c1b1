"""Tokenise documents and pack them into fixed-length blocks for causal language modelling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100  # label value that Hugging Face losses skip

# A fast tokenizer keeps hundreds of bytes of bookkeeping per token (offsets, token strings, masks) until its call
# returns: one 21 MB single-line document took train-experts from 0.5 to 3.6 GB. Texts are therefore tokenized in
# pieces of at most this many characters (about 16k tokens of code), and ids are kept as int32 arrays, not lists.
PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 18  # characters per tokenizer call (several pieces or short documents)


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` as consecutive pieces of at most `size` characters whose concatenation is `text`.

    Each cut falls just before a single space between two non-space characters. Byte-level BPE pre-tokenizers
    (GPT-2, Llama 3, SmolLM and the shipped tiny base) start a new pre-token there anyway, and merges never cross
    pre-tokens, so the pieces' ids joined are the whole text's ids. A stretch of size / 2 characters without such a
    space (a base64 blob) is cut at `size`, where only the tokens touching the cut can differ.
    """
    start = 0
    while len(text) - start > size:
        cut = _word_start(text, start + size // 2, start + size)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _word_start(text: str, low: int, high: int) -> int:
    """The last position p in (low, high) with a space at p between two non-space characters, else `high`."""
    p = text.rfind(" ", low, high)
    while p > low:
        if not text[p - 1].isspace() and not text[p + 1].isspace():
            return p
        p = text.rfind(" ", low, p)
    return high


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> np.ndarray:
    """int32 ids of `text` (no special tokens), tokenized piece by piece; with `max_tokens`, only that many."""
    parts, count = [], 0
    for piece in text_pieces(text):
        parts.append(np.asarray(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=np.int32))
        count += len(parts[-1])
        if max_tokens is not None and count >= max_tokens:
            break  # the rest of a long document is never read, so it is never tokenized
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return ids if max_tokens is None else ids[:max_tokens]


def tokenize(tokenizer, texts: Sequence[str], add_eos: bool = True,
             max_tokens: int | None = None) -> list[np.ndarray]:
    """Token ids of each text (no special tokens but a trailing EOS, which marks the document boundary).

    With `max_tokens`, each text keeps its first `max_tokens` ids, EOS included, as slicing the full ids would.
    """
    if max_tokens is None:
        ids = _batched_token_ids(tokenizer, texts)
    else:  # only a prefix is needed: piece by piece, stopping early
        ids = [token_ids(tokenizer, text, max_tokens) for text in texts]
    eos = np.asarray([tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else [],
                     dtype=np.int32)
    return [np.concatenate([seq, eos])[:max_tokens] for seq in ids]


def _batched_token_ids(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """int32 ids of every text: the pieces of all texts go to the tokenizer in calls of about BATCH_CHARS
    characters, so that a fast tokenizer still works on many short documents in parallel within one call."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[tuple[int, str]] = []

    def flush() -> None:
        if batch:
            encoded = tokenizer([piece for _, piece in batch], add_special_tokens=False)["input_ids"]
            for (index, _), seq in zip(batch, encoded):
                parts[index].append(np.asarray(seq, dtype=np.int32))
            batch.clear()

    size = 0
    for index, text in enumerate(texts):
        for piece in text_pieces(text):
            batch.append((index, piece))
            size += len(piece)
            if size >= BATCH_CHARS:
                flush()
                size = 0
    flush()
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int32) for p in parts]


def pack(token_lists: Sequence[Sequence[int]], block_size: int, pad_id: int = 0,
         keep_remainder: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the token lists and cut them into blocks of `block_size`.

    Returns `(input_ids, labels)`, both [N, block_size] int64. The last, shorter block is padded with `pad_id`
    and its padded labels are IGNORE_INDEX when `keep_remainder`, else dropped. Labels equal inputs elsewhere:
    Hugging Face causal LMs shift them internally.
    """
    # one int64 array built from the per-document arrays, never a Python list of every token
    flat = torch.from_numpy(np.concatenate([np.asarray(seq, dtype=np.int64) for seq in token_lists])
                            if len(token_lists) else np.zeros(0, dtype=np.int64))
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
