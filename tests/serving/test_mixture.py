"""Top-k mixing in the engine: a request over k experts runs as k rows of one forward and samples from
Σ_i w_i softmax(logits_i). Compared with a plain reference (k full PEFT forwards per token, mixed in float64)."""

from __future__ import annotations

import math

import pytest
import torch

from upcycle.introvert.run import Run
from upcycle.introvert.serving import engine_for_run
from upcycle.serving.config import EngineConfig
from upcycle.serving.engine import Engine, Failed, Finished
from upcycle.serving.errors import ExpertRemoved, InvalidRequest, RequestTimeout
from upcycle.serving.sampling import SamplingParams, mixture_scores

PROMPT = "def heapify(x):"


def _greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def reference_mixture_greedy(run: Run, experts: list[str], weights: list[float], prompt_ids: list[int],
                             max_tokens: int) -> list[int]:
    """Greedy decoding from a mixture of experts, as a plain loop with no cache and no batching:

        repeat max_tokens times:
            for each expert i: logits_i = last-position logits of a full forward of (prompt + generated so far)
                               through the base with expert i's PEFT adapter
            p[v] = sum over i of weights[i] * softmax(logits_i)[v]      (in float64)
            append argmax over v of p[v]
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), run.expert_dir(experts[0]),
                                      adapter_name=experts[0]).eval()
    for expert in experts[1:]:
        model.load_adapter(run.expert_dir(expert), adapter_name=expert)
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        mixture = None
        for expert, weight in zip(experts, weights, strict=True):
            model.set_adapter(expert)
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            probs = weight * torch.softmax(logits, dim=-1)
            mixture = probs if mixture is None else mixture + probs
        ids.append(int(mixture.argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture
def engine(fake_run_dir):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=8, prefill_chunk=4, max_seq_len=64))
    yield engine
    engine.close()


def _submit(engine: Engine, prompt: str, expert, params: SamplingParams, weights=None):
    events: list = []
    request = engine.submit(engine.encode(prompt), expert, params, events.append, weights)
    return events, request


def _alone(engine: Engine, prompt: str, expert, params: SamplingParams, weights=None) -> list[int]:
    _, request = _submit(engine, prompt, expert, params, weights)
    engine.run_until_idle()
    return request.generated


def test_top2_greedy_equals_the_plain_reference(engine, fake_run_dir):
    experts, weights = ["expert-00001", "expert-00002"], [0.6, 0.4]
    ids = engine.encode(PROMPT)
    expected = reference_mixture_greedy(Run.open(fake_run_dir), experts, weights, ids, 10)
    # in a batch with a single-expert row and the base, so the group's rows sit between others
    _, single = _submit(engine, "import json\n", "expert-00000", _greedy(10))
    events, mixed = _submit(engine, PROMPT, experts, _greedy(10), weights)
    _, base = _submit(engine, "x", None, _greedy(10))
    engine.run_until_idle()
    assert isinstance(events[-1], Finished) and mixed.generated == expected
    singles = [_alone(engine, PROMPT, e, _greedy(10)) for e in experts]
    assert all(expected != s for s in singles)  # sanity: the mixture is neither expert alone
    assert single.generated == _alone(engine, "import json\n", "expert-00000", _greedy(10))
    assert base.generated == _alone(engine, "x", None, _greedy(10))


def test_top3_with_uneven_weights_equals_the_reference(engine, fake_run_dir):
    experts, weights = ["expert-00003", "expert-00000", "expert-00002"], [0.5, 0.3, 0.2]
    ids = engine.encode("class Fraction")
    expected = reference_mixture_greedy(Run.open(fake_run_dir), experts, weights, ids, 8)
    assert _alone(engine, "class Fraction", experts, _greedy(8), weights) == expected


def test_one_expert_mixture_is_the_plain_request(engine):
    seeded = SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, seed=5, ignore_eos=True)
    for params in (_greedy(10), seeded):
        plain = _alone(engine, PROMPT, "expert-00001", params)
        assert _alone(engine, PROMPT, ["expert-00001"], params, [1.0]) == plain


def test_mixture_scores_are_the_log_of_the_weighted_probability_mixture():
    torch.manual_seed(0)
    logits, weights = torch.randn(3, 11) * 4, torch.tensor([0.5, 0.3, 0.2])
    expected = [math.log(sum(float(weights[i]) * float(torch.softmax(logits[i].double(), 0)[v]) for i in range(3)))
                for v in range(11)]
    assert torch.allclose(mixture_scores(logits, weights), torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # temperature applies to the mixture: scores at T are log p / T up to a constant, for one expert softmax(l / T)
    one = mixture_scores(logits[:1], torch.ones(1))
    assert torch.allclose(torch.softmax(one / 0.7, 0), torch.softmax(logits[0].double() / 0.7, 0), atol=1e-12)


def test_seeded_sampling_from_a_mixture_is_reproducible_and_tiny_top_p_is_greedy(engine):
    experts, weights = ["expert-00001", "expert-00003"], [0.5, 0.5]
    seeded = SamplingParams(max_tokens=8, temperature=1.5, seed=3, ignore_eos=True)
    assert _alone(engine, "a", experts, seeded, weights) == _alone(engine, "a", experts, seeded, weights)
    nucleus = SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)
    assert _alone(engine, "a", experts, nucleus, weights) == _alone(engine, "a", experts, _greedy(8), weights)


def test_groups_leaving_from_the_middle_keep_every_other_request_exact(engine):
    """A short group finishing first leaves a gap that later rows of another width must close (the shift path)."""
    plan = [("a", ["expert-00000", "expert-00001"], 3), ("import json\n", "expert-00002", 10),
            ("# sorted", ["expert-00003", "expert-00001", "expert-00002"], 10), ("x", None, 10),
            ("return", ["expert-00002", "expert-00000"], 5)]
    submitted = [_submit(engine, p, e, _greedy(n)) for p, e, n in plan]
    engine.run_until_idle()
    for (events, request), (prompt, expert, n) in zip(submitted, plan, strict=True):
        assert isinstance(events[-1], Finished)
        assert request.generated == _alone(engine, prompt, expert, _greedy(n)), (prompt, expert)
    assert engine.cache.snapshot()["active_in_use"] == 0


def test_a_group_is_admitted_whole_and_in_turn(fake_run_dir):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=3, max_seq_len=64))
    for expert in ("expert-00002", "expert-00003"):  # in CPU memory: only rows can hold the group back
        future = engine.cache.prefetch(expert)
        if future is not None:
            future.result()
    try:
        _, first = _submit(engine, "a", "expert-00000", _greedy(4))
        _, second = _submit(engine, "b", "expert-00001", _greedy(20))
        engine.step()
        _, group = _submit(engine, "c", ["expert-00002", "expert-00003"], _greedy(3))
        _, later = _submit(engine, "d", "expert-00003", _greedy(3))
        engine.step()
        assert engine.running == [first, second] and engine.rows_in_use == 2  # one row free: not half-admitted
        assert group.slots == [-1, -1] and later in engine.waiting  # and nothing overtakes the group
        while first in engine.running:
            engine.step()
        engine.step()
        assert group in engine.running and engine.rows_in_use == 3 and -1 not in group.slots
        engine.run_until_idle()
        assert engine.cache.snapshot()["active_in_use"] == 0
    finally:
        engine.close()


def test_cancel_timeout_and_removal_retire_the_whole_group(fake_run_dir):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=2, n_slots=2, max_seq_len=64))
    try:
        events, group = _submit(engine, "a", ["expert-00000", "expert-00001"], _greedy(30))
        engine.step()
        group.cancel()
        engine.step()
        assert not engine.running and isinstance(events[-1], Failed)
        assert engine.cache.snapshot()["active_in_use"] == 0  # both slots came back: another pair fits at once
        events, _ = _submit(engine, "a", ["expert-00002", "expert-00003"], _greedy(3))
        engine.run_until_idle()
        assert isinstance(events[-1], Finished)
        busy, _ = _submit(engine, "b", "expert-00000", _greedy(20))
        engine.step()
        waiting, _ = _submit(engine, "c", ["expert-00000", "expert-00002"], _greedy(3))
        engine.cache.unregister("expert-00002")
        engine.run_until_idle()
        assert isinstance(waiting[-1].error, ExpertRemoved) and "expert-00002" in waiting[-1].error.message
        assert isinstance(busy[-1], Finished)
        engine.config.request_timeout_s = 0.0
        events, _ = _submit(engine, "a", ["expert-00000", "expert-00001"], _greedy(30))
        engine.run_until_idle()
        assert isinstance(events[-1].error, RequestTimeout)
        assert engine.cache.snapshot()["active_in_use"] == 0 and engine.rows_in_use == 0
    finally:
        engine.close()


def test_mixtures_the_engine_cannot_run_are_refused_at_submit(engine):
    with pytest.raises(InvalidRequest, match="max_batch"):
        engine.submit([5], [f"expert-0000{i % 4}" for i in range(9)], _greedy())
    with pytest.raises(InvalidRequest, match="weights"):
        engine.submit([5], ["expert-00000", "expert-00001"], _greedy(), weights=[1.0])
    with pytest.raises(InvalidRequest, match="non-negative"):
        engine.submit([5], ["expert-00000", "expert-00001"], _greedy(), weights=[1.0, -1.0])
    assert engine.queue_depth == 0
