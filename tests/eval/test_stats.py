"""The shared interval helpers: a Student-t interval over seeds, bootstrap intervals over documents."""

from __future__ import annotations

import numpy as np
import pytest

from upcycle.eval.stats import bootstrap_ci, mean_ci, t_halfwidth, token_perplexity


def test_mean_ci_is_a_t_interval():
    stats = mean_ci([1.0, 2.0, 3.0])
    assert stats["mean"] == pytest.approx(2.0) and stats["n"] == 3
    assert stats["ci95"] == pytest.approx(4.302653 * 1.0 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    assert mean_ci([5.0])["ci95"] is None and t_halfwidth([]) is None


def test_token_perplexity_weights_documents_by_tokens():
    assert token_perplexity(np.array([2.0, 4.0]), np.array([1, 3])) == pytest.approx(np.exp(6.0 / 4))
    assert token_perplexity(np.zeros(0), np.zeros(0, dtype=int)) == 1.0


def test_bootstrap_ci_is_seeded_brackets_the_statistic_and_pairing_narrows_it():
    rng = np.random.default_rng(0)
    hard = rng.gamma(2.0, 2.0, 200)  # per-document difficulty both methods share
    a, b = hard + rng.normal(0, 0.1, 200), hard * 1.05 + rng.normal(0, 0.1, 200)
    mean_a = lambda idx: float(a[idx].mean())  # noqa: E731
    low, high = bootstrap_ci(mean_a, 200, 500, seed=1)
    assert low < a.mean() < high and bootstrap_ci(mean_a, 200, 500, seed=1) == [low, high]
    paired = bootstrap_ci(lambda idx: float(b[idx].mean() / a[idx].mean()), 200, 500, seed=1)
    unpaired_width = 2 * (high - low) / a.mean()
    assert paired[1] - paired[0] < unpaired_width / 4
    assert bootstrap_ci(mean_a, 200, 0) is None
