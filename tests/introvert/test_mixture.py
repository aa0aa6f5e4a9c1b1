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


def _heldout_corpus(root: Path) -> Path:
    """Chunks of standard-library modules from packages no cluster of `run` was built from."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("http/client.py", "xml/dom/minidom.py", "unittest/case.py"):
        lines = (stdlib_root() / name).read_text().splitlines()
        for i in range(0, 800, 80):
            (root / f"{name.replace('/', '_')[:-3]}_{i}.py").write_text("\n".join(lines[i:i + 80]))
    return root


def _evaluate(run, monkeypatch, threshold: float | None, **settings) -> dict:
    """`evaluate` with the guard's threshold forced to `threshold` (None: calibrated as usual)."""
    from upcycle.introvert import evaluate as module
    from upcycle.introvert.config import EvalConfig
    from upcycle.introvert.router import Guard

    if threshold is not None:
        monkeypatch.setattr(module, "calibrate_guard", lambda *_: Guard(threshold, np.zeros(0)))
    return module.evaluate(run, EvalConfig(baselines=False, bootstrap=50, **settings))


def test_evaluate_reports_top_k_mixtures_with_a_temperature_chosen_on_validation(run, capsys, tmp_path):
    from upcycle.introvert.config import RoutingConfig
    from upcycle.introvert.data import load_run_data
    from upcycle.introvert.embedding import load_embedder
    from upcycle.introvert.router import calibrate_guard
    from upcycle.introvert.run import Run

    heldout = _heldout_corpus(tmp_path / "heldout")
    code, out, _ = run_cli(capsys, ["introvert", "evaluate", run, "--eval.baselines", "false",
                                    "--eval.bootstrap", "50", "--eval.heldout_data", heldout])
    assert code == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"base", "routed", "routed-top2", "routed-top3"} <= set(results["methods"])  # 1, 2, 4 capped at K = 3
    mixture = results["mixture"]
    assert mixture["top_ks"] == [1, 2, 3] and mixture["methods"]["3"] == "routed-top3"
    assert mixture["validation_documents"] == len(load_run_data(Run.of(run)).docs("validation"))
    for k, grid in mixture["validation_perplexity"].items():
        assert set(grid) == {"0.01", "0.03", "0.1", "0.3", "1.0"}
        assert mixture["chosen"][k] == float(min(grid, key=grid.get))  # the best T on validation, not on test
    assert len({m["tokens"] for m in results["methods"].values()}) == 1
    paired = {(p["method"], p["reference"]) for p in results["paired"]}
    assert {("routed-top2", "base"), ("routed-top3", "routed")} <= paired
    guard = results["guard"]
    embedder = load_embedder(Run.of(run).clusters_dir / "embedder")  # calibrated on the 1,000-char prompts
    on_prompts = calibrate_guard(Run.of(run), RoutingConfig(), embedder=embedder)
    assert guard["threshold"] == pytest.approx(on_prompts.threshold)
    assert guard["threshold"] != pytest.approx(calibrate_guard(Run.of(run), RoutingConfig()).threshold)
    assert guard["validation_prompts_flagged"] <= 0.01 + 1 / mixture["validation_documents"]
    assert 0 <= guard["test"]["flagged"] <= guard["test"]["documents"] == results["documents"]
    assert set(guard["heldout"]["methods"]) == {"base", "routed", "guarded-base", "guarded-mixture"}
    assert guard["heldout"]["documents"] > 0 and 0 <= guard["heldout"]["flagged_share"] <= 1
    report = (run / "report.md").read_text()
    assert "routed top-2 mixture" in report and "Out-of-domain guard" in report and "held-out domain" in report
    assert "routed top-3 mixture" in out


def test_a_near_zero_temperature_mixes_nothing_in(run, monkeypatch):
    results = _evaluate(run, monkeypatch, None, temperatures=[1e-6], guard_percentile=None)
    methods = results["methods"]
    assert results["mixture"]["chosen"] == {"2": 1e-6, "3": 1e-6}
    assert methods["routed-top2"]["perplexity"] == pytest.approx(methods["routed"]["perplexity"], rel=1e-9)
    assert "guard" not in results


def test_the_guard_rows_follow_the_threshold(run, monkeypatch, tmp_path):
    heldout = str(_heldout_corpus(tmp_path / "heldout"))
    nothing = _evaluate(run, monkeypatch, 4.0, heldout_data=heldout)["guard"]  # nothing lies beyond d² = 4
    for split in ("test", "heldout"):
        ppl = {name: m["perplexity"] for name, m in nothing[split]["methods"].items()}
        assert nothing[split]["flagged"] == 0
        assert ppl["guarded-base"] == pytest.approx(ppl["routed"], rel=1e-9)
        assert ppl["guarded-mixture"] == pytest.approx(ppl["routed"], rel=1e-9)
    results = _evaluate(run, monkeypatch, -1.0, heldout_data=heldout)  # everything does
    everything, methods = results["guard"], results["methods"]
    assert everything["test"]["flagged"] == everything["test"]["documents"]
    assert everything["test"]["methods"]["guarded-base"]["perplexity"] == pytest.approx(
        methods["base"]["perplexity"], rel=1e-9)
    assert everything["test"]["methods"]["guarded-mixture"]["perplexity"] == pytest.approx(
        methods["routed-top2"]["perplexity"], rel=1e-9)  # beyond it: the top-2 mixture at the T chosen for k = 2
    heldout_ppl = {name: m["perplexity"] for name, m in everything["heldout"]["methods"].items()}
    assert heldout_ppl["guarded-base"] == pytest.approx(heldout_ppl["base"], rel=1e-9)
    assert nothing["heldout"]["methods"]["base"] == everything["heldout"]["methods"]["base"]


@pytest.mark.parametrize("flags, needle", [
    (["--eval.top_ks", "[1, 4]"], "--eval.top_ks 4: top_k must be between 1 and the number of experts (3)"),
    (["--eval.top_ks", "[0]"], "--eval.top_ks must be a non-empty list of values >= 1"),
    (["--eval.temperatures", "[0.1, 0]"], "--eval.temperatures must be a non-empty list of values > 0"),
    (["--eval.heldout_data", "/no/such/corpus"], "--eval.heldout_data /no/such/corpus: no such file or directory"),
    (["--eval.heldout_data", "stdlib", "--eval.guard_percentile", "null"], "give --eval.guard_percentile too"),
])
def test_bad_evaluation_settings_are_one_line_errors(run, capsys, flags, needle):
    code, _, err = run_cli(capsys, ["introvert", "evaluate", run, "--eval.baselines", "false", *flags])
    assert_one_line_error(code, err, needle)
