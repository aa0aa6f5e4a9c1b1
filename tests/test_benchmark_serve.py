"""benchmarks/serve.py's estimator and its `--rounds-at` option (the benchmark itself is run, not tested)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"


@pytest.fixture(scope="module")
def serve():
    spec = importlib.util.spec_from_file_location("bench_serve", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _block(mine: list[float], theirs: list[float]) -> dict:
    return {"routed": {"tokens_per_s_per_round": mine}, "base": {"tokens_per_s_per_round": theirs}}


tokens_per_s = st.floats(1.0, 1000.0)


@given(base=st.lists(tokens_per_s, min_size=1, max_size=9), data=st.data())
def test_paired_ratio_is_the_median_of_same_round_ratios(serve, base, data):
    routed = data.draw(st.lists(tokens_per_s, min_size=len(base), max_size=len(base)))
    expected = statistics.median([m / t for m, t in zip(routed, base, strict=True)])
    assert serve.paired_ratio(_block(routed, base), "routed", "base") == pytest.approx(expected, abs=5e-4)


@given(loads=st.lists(st.floats(0.3, 3.0), min_size=3, max_size=9), data=st.data())
def test_paired_ratio_is_not_moved_by_one_disturbed_round(serve, loads, data):
    """Host load that falls on a whole round slows both configurations alike; a burst that hits one configuration
    in one round must not move the estimate either (a ratio of the two medians can move with it)."""
    base = [100.0 * load for load in loads]
    routed = [0.9 * b for b in base]
    hit = data.draw(st.integers(0, len(loads) - 1))
    routed[hit] *= data.draw(st.floats(0.2, 0.95))
    assert serve.paired_ratio(_block(routed, base), "routed", "base") == pytest.approx(0.9, abs=5e-4)


def test_paired_ratio_needs_the_same_rounds(serve):
    with pytest.raises(ValueError):
        serve.paired_ratio(_block([1.0, 2.0], [1.0]), "routed", "base")


def test_rounds_at_overrides_chosen_levels(serve):
    args = serve.parse(["--rounds", "3", "--rounds-at", "1=8, 16=6", "--concurrency", "1,16,64"])
    assert [serve.rounds_at(c, args) for c in (1, 16, 64)] == [8, 6, 3]


@pytest.mark.parametrize("bad", ["16", "16=0", "x=2", "16=two"])
def test_bad_rounds_at_is_a_one_line_usage_error(serve, capsys, bad):
    with pytest.raises(SystemExit) as exit_:
        serve.parse(["--rounds-at", bad])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--rounds-at" in message and "CONCURRENCY=ROUNDS" in message
