"""Typed settings of the tiny-base pretraining recipe (importable without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle.data.splits import SplitConfig
from upcycle.training.config import TrainConfig


@dataclass
class TinyLlamaShape:
    """Architecture of the tiny base (a LlamaConfig subset)."""

    vocab_size: int = 4096
    """BPE vocabulary size, special tokens included."""
    hidden_size: int = 128
    """Model width."""
    intermediate_size: int = 384
    """SwiGLU FFN width."""
    num_hidden_layers: int = 4
    """Decoder blocks."""
    num_attention_heads: int = 4
    """Attention heads (no grouped-query attention at this size)."""
    max_position_embeddings: int = 1024
    """Longest sequence the rotary embedding is configured for."""


@dataclass
class PretrainConfig:
    """Everything `upcycle pretrain` needs; the defaults rebuild the shipped base."""

    data: str = "stdlib"
    """Corpus spec (see upcycle.data.corpus)."""
    shape: TinyLlamaShape = field(default_factory=TinyLlamaShape)
    """Model architecture."""
    block_size: int = 256
    """Tokens per training block."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=4000, batch_size=16, lr=3e-3, warmup_steps=100, weight_decay=0.1, eval_every=200, eval_blocks=256,
        checkpoint_every=200, seed=0))
    """Optimisation settings."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """Held-out fractions."""
