"""Uncertainty of the numbers the experiments report: a Student-t interval over seeds and bootstrap intervals over
documents (plain and paired).

numpy only at import; the t quantile comes from `scipy.special.stdtrit` (scipy.stats takes seconds to import).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def t_halfwidth(values: Sequence[float]) -> float | None:
    """Half-width of the 95% Student-t interval of the mean of `values` (None with fewer than two)."""
    from scipy.special import stdtrit

    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return None
    return float(stdtrit(len(arr) - 1, 0.975) * arr.std(ddof=1) / math.sqrt(len(arr)))


def mean_ci(values: Sequence[float]) -> dict:
    """Mean, the half-width of a 95% Student-t interval over seeds (None with one seed), n and the values."""
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "ci95": t_halfwidth(arr), "n": len(arr), "values": arr.tolist()}


def token_perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    """exp(total NLL / total tokens): token-weighted perplexity of documents with NLL sums `nll` [N], `count` [N]."""
    return math.exp(nll.sum() / max(count.sum(), 1))


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, samples: int, seed: int = 0
                 ) -> list[float] | None:
    """[2.5, 97.5] percentiles of `statistic(indices)` over `samples` resamples of n items with replacement (None
    with no samples).

    Paired: when `statistic` compares two methods on the same resampled indices, the spread the items share (some
    documents are hard for every method) cancels, which dominates the per-method intervals.
    """
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(samples)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
