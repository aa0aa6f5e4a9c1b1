"""A fixed-capacity KV cache for continuous batching: one row per running request, rows kept contiguous.

Legend: R rows (max batch), n running rows, H key/value heads, L max sequence length, D head dim, T tokens this step.

Buffers are [R, H, L + 1, D] per layer, allocated once. Row r holds request r's keys at positions 0..len[r]-1. In a
step every row brings T_r <= T new tokens (a prefill chunk or one decode token), padded to T; real tokens are written
at len[r] + t, padded ones into the spare column L (a trash slot nobody attends to). Attention gets the [n, H, :K, D]
view (K = the longest row after the step) and a boolean mask letting query t of row r see keys 0..len[r] + t.
Running rows always occupy rows 0..n-1 (a finishing row is replaced by the last one), so that view is free.

It implements just what Hugging Face attention layers call on a cache: `update(keys, values, layer_idx, ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SlotKVCache:
    """Per-row KV buffers of fixed capacity; see the module docstring for the layout."""

    def __init__(self, n_layers: int, max_rows: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.max_rows, self.max_len = max_rows, max_len
        shape = (max_rows, n_kv_heads, max_len + 1, head_dim)  # +1: the trash column for padding tokens
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * max_rows
        self._rows: torch.Tensor | None = None  # [n, T] row index of each new token
        self._positions: torch.Tensor | None = None  # [n, T] where each new token goes (max_len for padding)
        self._kv_len = 0
        self._first = 0  # the step's rows are first .. first + n - 1
        self._new: list[int] = []

    @classmethod
    def for_model(cls, config, max_rows: int, max_len: int, dtype: torch.dtype, device) -> SlotKVCache:
        """Size the buffers from a Hugging Face decoder config."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(text.num_hidden_layers, max_rows, max_len, kv_heads, head_dim, dtype, device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def plan(self, new_tokens: Sequence[int], first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a step where row first + r adds `new_tokens[r]` tokens; returns (position_ids [n, T], mask
        [n, 1, T, K]). `first` > 0 runs rows first to first + n − 1 only, a contiguous part of the batch (prefilling
        rows apart from decoding ones, or a failing request isolated).

        Must be followed by the forward (which calls `update` once per layer) and then `commit`. A forward that
        fails before `commit` leaves the cache as it was: the next plan writes the same positions again.
        """
        n, steps = len(new_tokens), max(new_tokens)
        device = self.keys[0].device
        lengths = self.lengths[first: first + n]
        start = torch.tensor(lengths, device=device)[:, None]  # [n, 1]
        offsets = torch.arange(steps, device=device)[None, :]  # [1, T]
        position_ids = start + offsets  # [n, T]
        real = offsets < torch.tensor(new_tokens, device=device)[:, None]  # [n, T]
        if max(length + new for length, new in zip(lengths, new_tokens, strict=True)) > self.max_len:
            raise ValueError("a row would exceed the KV cache's max_len; the engine should have stopped it")
        self._positions = torch.where(real, position_ids, self.max_len)
        self._rows = torch.arange(first, first + n, device=device)[:, None].expand(n, steps)
        self._kv_len = max(length + new for length, new in zip(lengths, new_tokens, strict=True))  # K: longest row
        self._first = first
        keys = torch.arange(self._kv_len, device=device)  # [K]
        mask = keys[None, None, :] <= position_ids[:, :, None]  # [n, T, K]: causal over the row's own prefix
        self._new = list(new_tokens)
        return position_ids, mask[:, None]  # [n, 1, T, K]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values ([n, H, T, D]) for `layer_idx`; return the [n, H, K, D] views to attend."""
        n = key_states.shape[0]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # advanced indices on dims 0 and 2 put their [n, T] shape first: the target is [n, T, H, D]
        keys[self._rows, :, self._positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._rows, :, self._positions] = value_states.transpose(1, 2).to(values.dtype)
        rows = slice(self._first, self._first + n)
        return keys[rows, :, : self._kv_len], values[rows, :, : self._kv_len]

    def commit(self) -> None:
        """The step's forward finished: advance every row by its real token count."""
        for row, count in enumerate(self._new, start=self._first):
            self.lengths[row] += count
        self._new = []

    def reset_row(self, row: int) -> None:
        """Row `row` starts a new request (old contents are never read: the mask stops at the row's length)."""
        self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (keeps running rows contiguous when row `dst` finished)."""
        if src == dst:
            return
        used = self.lengths[src]
        for buffer in self.keys + self.values:
            buffer[dst, :, :used].copy_(buffer[src, :, :used])
        self.lengths[dst] = used
        self.lengths[src] = 0

    # Hugging Face asks caches a few questions outside attention; none applies to positions we pass explicitly.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    @property
    def is_compileable(self) -> bool:
        return False
