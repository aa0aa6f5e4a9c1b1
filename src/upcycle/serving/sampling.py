"""Choosing the next token (greedy, temperature, top-p) and turning tokens into streamed text with stop strings.

A request mixing k experts (c-BTM) samples from one distribution: `mixture_scores` turns the k rows' logits into the
log of the mixture, log Σ_i w_i softmax(logits_i), which then goes through the same temperature / top-p / greedy
path as a single row's logits. So the temperature applies to the mixture, not to each expert: the sampled
distribution is p^(1/T) / Σ p^(1/T) with p the mixture (T = 1: p itself; greedy: argmax of p). With one expert this is
softmax(logits / T), exactly what a single row samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds `torch.Generator.manual_seed` takes."""


@dataclass
class SamplingParams:
    """How one request generates."""

    max_tokens: int = 16
    """Most tokens to generate (the context limit may stop it earlier)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches top_p (1: all tokens)."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first occurrence of any of these strings (which is not returned)."""
    seed: int | None = None
    """Seed of this request's own generator, for reproducible sampling."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks use it for fixed-length outputs)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be between {SEED_MIN} and {SEED_MAX}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` [n, V] (or mixture log-probabilities) following that row's params (greedy rows
    share one argmax)."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, p in enumerate(params):
        if not p.greedy:
            chosen[row] = _sample_row(logits[row], p, generators[row])
    return chosen


def mixture_scores(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [V] (float64) of the mixture Σ_i weights[i] · softmax(logits[i]) of k rows' logits [k, V]
    with weights [k] summing to 1; sampling them as logits samples the mixture (see the module docstring)."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)  # [k, V]
    return torch.logsumexp(log_probs + weights.double().log()[:, None], dim=0)  # [V]: mixed in probability space


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    # In float64 and from the max, a tiny temperature (1e-300) stays finite: the best token gets 0, the rest -inf
    # (in float32 the temperature itself would round to 0 and every probability to NaN).
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)  # [V]
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of strictly more likely tokens
        sorted_probs[before >= params.top_p] = 0  # keeps the top token always (its `before` is 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Incremental detokenisation with stop strings: `add` returns the text that is safe to send now.

    Decoding uses a short window (the offsets trick of TGI / vLLM) so each token costs O(1), waits while the text ends
    in an incomplete UTF-8 sequence, and holds back any tail that could still become a stop string.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (stop strings included until they are cut)
        self.sent = 0  # characters of `text` already returned
        self._prefix_offset = 0
        self._read_offset = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return newly sendable text (sets `stopped` when a stop string appeared)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset: self._read_offset], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self.text += window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: return whatever was held back (except a partial stop string's cut)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held_tail()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent: end], end
        return out

    def _first_stop(self) -> int | None:
        # No stop string can start in text already sent: a tail that might begin one is always held back.
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        return min(hits) if hits else None

    def _held_tail(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
