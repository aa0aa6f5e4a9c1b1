"""c-BTM top-k mixtures in `IntrovertExperts` and in `upcycle introvert evaluate`, and the out-of-domain guard's
rows in evaluation, on a tiny random Llama and a small three-topic corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.run_helpers import TINY_EXPERT, assert_one_line_error, make_corpus, run_cli
from upcycle.cli import main
from upcycle.data.corpus import stdlib_root
from upcycle.introvert.router import Route


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir) -> Path:
    corpus = make_corpus(tmp_path_factory.mktemp("corpus"))
    path = tmp_path_factory.mktemp("runs") / "run"
    assert main(["introvert", "cluster", "--data", str(corpus), "--base", str(tiny_llama_dir),
                 "--clustering.clusters", "3", "--clustering.embedder", "tfidf", "--out", str(path),
                 "--splits.validation", "0.2", "--splits.test", "0.2"]) == 0
    assert main(["introvert", "train-experts", str(path), *TINY_EXPERT]) == 0
    return path


@pytest.fixture(scope="module")
def experts(run):
    from upcycle.introvert.model import IntrovertExperts

    return IntrovertExperts.from_run(run)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    root = stdlib_root()
    return [(root / "json" / "decoder.py").read_text()[:900], (root / "asyncio" / "locks.py").read_text()[:700],
            (root / "email" / "utils.py").read_text()[:500], "x"]


def _ids(experts, texts, add_eos=False):
    from upcycle.data.packing import tokenize

    return tokenize(experts.tokenizer, texts, add_eos=add_eos)


@pytest.mark.parametrize("top_k, temperature", [(2, 0.3), (3, 0.05), (3, 10.0)])
def test_batched_mixture_matches_the_plain_float64_loop(experts, texts, top_k, temperature):
    from upcycle.introvert.config import RoutingConfig
    from upcycle.introvert.model import reference_mixture_nll
    from upcycle.introvert.router import EmbeddingRouter

    router = EmbeddingRouter(experts.router.embedder, experts.router.centroid_router,
                             RoutingConfig(top_k=top_k, temperature=temperature, guard_percentile=None))
    routes = router.decide(texts)
    routes[-1] = Route((), (), routes[-1].distance, False, None)  # sent to the base by a guard
    ids = _ids(experts, texts)
    nll, count = experts.mixture_nll(ids, routes, block_size=32, batch_size=3)
    ref_nll, ref_count = reference_mixture_nll(experts, ids, routes, block_size=32)
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    assert all(len(route.clusters) == top_k for route in routes[:-1])


def test_top_1_is_todays_routed_score(experts, texts):
    routes = experts.router.decide(texts, top_k=1)
    nll, count = experts.mixture_nll(_ids(experts, texts, add_eos=True), routes)  # token_nll scores the EOS too
    routed = experts.token_nll(texts, experts.route(texts), max_tokens=None)
    assert [r.experts[0] for r in routes] == experts.route(texts)
    np.testing.assert_allclose(nll, [total for total, _ in routed], rtol=1e-5)
    np.testing.assert_array_equal(count, [n for _, n in routed])


def test_a_mixture_with_one_weight_of_one_is_that_expert(experts, texts):
    ids = _ids(experts, texts)
    for first, second in [(0, 1), (2, 0)]:
        routes = [Route((first, second), (1.0, 0.0), 0.0, True, None)] * len(texts)
        alone = [Route((first,), (1.0,), 0.0, True, None)] * len(texts)
        np.testing.assert_allclose(experts.mixture_nll(ids, routes)[0], experts.mixture_nll(ids, alone)[0],
                                   rtol=1e-9)
    # ... and the experts do differ, so the weights above decide something
    one, other = (experts.mixture_nll(ids, [Route((c,), (1.0,), 0.0, True, None)] * len(texts))[0] for c in (0, 1))
    assert not np.allclose(one, other, rtol=1e-6)
