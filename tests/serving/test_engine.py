"""Continuous batching: mixed batches equal requests run alone (and PEFT), limits, removal, corruption, cancel."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from upcycle.introvert.serving import engine_for_run
from upcycle.serving.adapters import WEIGHTS_NAME
from upcycle.serving.config import EngineConfig
from upcycle.serving.engine import Delta, Engine, Failed, Finished, forward_groups
from upcycle.serving.errors import (
    AdapterError,
    ExpertRemoved,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    QueueFull,
    RequestTimeout,
    UnknownModel,
)
from upcycle.serving.sampling import SamplingParams
from upcycle.serving.synthetic import CORRUPTIONS, write_corrupt_adapter

PROMPTS = ["def heapify(x):", "import json\n", "class Fraction", "x", "return self._value + other", "# sorted"]
EXPERTS = ["expert-00000", None, "expert-00001", "expert-00002", "expert-00000", "expert-00003"]


def _collect(engine: Engine, prompt: str, expert: str | None, params: SamplingParams) -> tuple[list, object]:
    events: list = []
    request = engine.submit(engine.encode(prompt), expert, params, events.append)
    return events, request


def _greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(fake_run_dir):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=8, prefill_chunk=4, max_seq_len=64))
    yield engine
    engine.close()


def _alone(engine: Engine, prompt: str, expert: str | None, params: SamplingParams) -> list[int]:
    _, request = _collect(engine, prompt, expert, params)
    engine.run_until_idle()
    return request.generated


def test_mixed_batch_equals_each_request_alone(engine):
    submitted = [_collect(engine, p, e, _greedy()) for p, e in zip(PROMPTS, EXPERTS, strict=True)]
    steps = engine.run_until_idle()
    assert steps < 6 * 10  # they really ran together
    for (events, request), prompt, expert in zip(submitted, PROMPTS, EXPERTS, strict=True):
        assert isinstance(events[-1], Finished) and events[-1].reason == "length"
        assert request.generated == _alone(engine, prompt, expert, _greedy()), (prompt, expert)
    outputs = {tuple(r.generated) for _, r in submitted[:1] + submitted[4:5]}
    assert len(outputs) == 2  # same expert, different prompts: different text (sanity)


def test_request_joining_mid_run_equals_alone(engine):
    _, first = _collect(engine, PROMPTS[0], "expert-00001", _greedy(12))
    for _ in range(5):
        engine.step()
    _, late = _collect(engine, PROMPTS[4], "expert-00002", _greedy(12))  # joins while `first` decodes
    engine.run_until_idle()
    assert first.generated == _alone(engine, PROMPTS[0], "expert-00001", _greedy(12))
    assert late.generated == _alone(engine, PROMPTS[4], "expert-00002", _greedy(12))


def test_forward_groups_split_prefill_from_decode_only_when_padding_costs_more():
    assert forward_groups([1, 1, 1], [1, 1, 1], 0) == [[0, 1, 2]]  # all decoding: one forward, no padding
    assert forward_groups([1, 1, 9, 4], [1, 1, 1, 1], 16) == [[0, 1, 2, 3]]  # 2 x 8 positions: within 16
    assert forward_groups([1, 1, 9, 4], [1, 1, 1, 1], 15) == [[0, 1], [2, 3]]
    assert forward_groups([1, 9], [3, 1], 23) == [[0], [1]]  # a mixture of 3 decodes 3 rows: 24 positions
    assert forward_groups([9, 1, 1, 4, 1], [1] * 5, 0) == [[0], [1, 2], [3], [4]]  # contiguous runs only
    assert forward_groups([], [], 0) == []


def test_steps_that_split_prefill_from_decode_equal_each_request_alone(fake_run_dir):
    split = engine_for_run(fake_run_dir, EngineConfig(max_batch=8, prefill_chunk=4, max_seq_len=64,
                                                      mixed_step_max_padding=0))
    forwards = []
    real_forward = split._forward
    split._forward = lambda inputs, idx: (forwards.append(list(idx)), real_forward(inputs, idx))[1]
    _, first = _collect(split, PROMPTS[0], "expert-00001", _greedy(12))
    _, second = _collect(split, PROMPTS[5], "expert-00003", _greedy(12))
    for _ in range(5):
        split.step()
    forwards.clear()
    loading = split.cache.prefetch("expert-00002")
    if loading is not None:  # resident before it is asked for, so the next step admits it
        loading.result(timeout=20)
    _, late = _collect(split, PROMPTS[4], "expert-00002", _greedy(12))  # its prompt chunks meet two decoding rows
    split.step()
    assert forwards == [[0, 1], [2]]
    split.run_until_idle()
    for request, prompt, expert in ((first, PROMPTS[0], "expert-00001"), (second, PROMPTS[5], "expert-00003"),
                                    (late, PROMPTS[4], "expert-00002")):
        assert request.generated == _alone(split, prompt, expert, _greedy(12)), expert
    split.close()


def test_engine_matches_peft_generate(engine, fake_run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from upcycle.introvert.run import Run

    run = Run.open(fake_run_dir)
    submitted = [_collect(engine, p, e, _greedy(8)) for p, e in zip(PROMPTS[:3], EXPERTS[:3], strict=True)]
    engine.run_until_idle()
    for (_, request), prompt, expert in zip(submitted, PROMPTS[:3], EXPERTS[:3], strict=True):
        reference = AutoModelForCausalLM.from_pretrained(run.base).eval()
        if expert is not None:
            reference = PeftModel.from_pretrained(reference, run.expert_dir(expert)).eval()
        ids = torch.tensor([engine.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert request.generated == out[0, ids.shape[1]:].tolist(), expert


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(engine):
    seeded = SamplingParams(max_tokens=8, temperature=1.5, seed=7, ignore_eos=True)
    assert _alone(engine, "a", "expert-00001", seeded) == _alone(engine, "a", "expert-00001", seeded)
    nucleus = SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True)
    assert _alone(engine, "a", "expert-00001", nucleus) == _alone(engine, "a", "expert-00001", _greedy(8))


def test_streamed_deltas_concatenate_to_the_decoded_text(engine):
    events, request = _collect(engine, "def f(", "expert-00003", _greedy(12))
    engine.run_until_idle()
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert text == engine.tokenizer.decode(request.generated, skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_cut(engine):
    free = _alone(engine, "def f(", "expert-00001", _greedy(12))
    text = engine.tokenizer.decode(free, skip_special_tokens=True)
    assert len(text) >= 6, "the fixture model should produce some text here"
    stop = text[3:6]
    params = SamplingParams(max_tokens=12, temperature=0, stop=["never appears", stop], ignore_eos=True)
    events, _ = _collect(engine, "def f(", "expert-00001", params)
    engine.run_until_idle()
    streamed = "".join(e.text for e in events if isinstance(e, Delta))
    assert events[-1].reason == "stop" and streamed == text[: text.find(stop)]


def test_limits_are_enforced_at_submit(engine):
    with pytest.raises(PromptTooLong):
        engine.submit(list(range(10, 70)), None, _greedy(10))  # 60 + 10 > 64
    with pytest.raises(UnknownModel):
        engine.submit([5, 6], "expert-09999", _greedy())
    engine.config.max_waiting = 2
    engine.submit([5], None, _greedy())
    engine.submit([5], None, _greedy())
    with pytest.raises(QueueFull):
        engine.submit([5], None, _greedy())
    engine.run_until_idle()


def test_removed_expert_fails_its_waiting_requests_only(fake_run_dir):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=1, n_slots=2, max_seq_len=64))
    busy, _ = _collect(engine, "a", "expert-00000", _greedy(20))
    engine.step()  # occupies the only row
    waiting, _ = _collect(engine, "b", "expert-00001", _greedy(3))
    engine.step()
    engine.cache.unregister("expert-00001")
    engine.run_until_idle()
    assert isinstance(waiting[-1], Failed) and isinstance(waiting[-1].error, ExpertRemoved)
    assert isinstance(busy[-1], Finished)
    engine.close()


def test_corrupt_adapter_fails_only_its_request(fake_run_dir, tmp_path):
    shutil.copytree(fake_run_dir, tmp_path / "run")
    (tmp_path / "run" / "experts" / "expert-00002" / WEIGHTS_NAME).write_bytes(b"not safetensors")
    engine = engine_for_run(tmp_path / "run", EngineConfig(max_batch=4, max_seq_len=64))
    bad, _ = _collect(engine, "a", "expert-00002", _greedy(3))
    good, _ = _collect(engine, "a", "expert-00001", _greedy(3))
    engine.run_until_idle()
    assert isinstance(bad[-1], Failed) and isinstance(bad[-1].error, AdapterError)
    assert "expert-00002" in str(bad[-1].error)
    assert isinstance(good[-1], Finished)
    engine.close()


def test_cancel_and_timeout_free_their_rows(engine):
    events, request = _collect(engine, "a", "expert-00000", _greedy(30))
    engine.step()
    request.cancel()
    engine.step()
    assert not engine.running and isinstance(events[-1], Failed)
    engine.config.request_timeout_s = 0.0
    events, _ = _collect(engine, "a", None, _greedy(30))
    engine.run_until_idle()
    assert isinstance(events[-1].error, RequestTimeout)
    assert engine.cache.snapshot()["active_in_use"] == 0


def test_threaded_engine_generate_and_graceful_stop(engine):
    engine.start()
    results = [engine.generate(p, e, _greedy(6)) for p, e in zip(PROMPTS[:2], EXPERTS[:2], strict=True)]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 6 for r in results)
    events, _ = _collect(engine, "a", "expert-00003", _greedy(10))
    engine.stop(drain=True, timeout=30)
    assert isinstance(events[-1], Finished)  # drained, not cut off


def test_out_of_range_token_ids_are_refused_at_submit(engine):
    vocab = engine.vocab_size
    for ids in ([999_999], [-7], [vocab], [1, 2, 2**70]):
        with pytest.raises(InvalidRequest, match="out of range"):
            engine.submit(ids, None, _greedy(2))
    assert engine.queue_depth == 0
    engine.submit([vocab - 1], None, _greedy(2))  # the last id is fine
    engine.run_until_idle()


def test_a_request_failing_inside_a_step_fails_alone(engine):
    """A bad row (here: an id that slipped past validation) fails itself; its batch-mates finish as if alone."""
    good, good_request = _collect(engine, "def heapify(x):", "expert-00001", _greedy(6))
    bad, bad_request = _collect(engine, "import json\n", "expert-00002", _greedy(6))
    bad_request.prompt_ids[-1] = engine.vocab_size + 5  # the embedding lookup of this row raises
    engine.run_until_idle()
    assert isinstance(bad[-1], Failed) and bad[-1].error.status == 500
    assert "internal error" in bad[-1].error.message
    assert isinstance(good[-1], Finished) and good[-1].reason == "length"
    assert good_request.generated == _alone(engine, "def heapify(x):", "expert-00001", _greedy(6))
    assert engine.cache.snapshot()["active_in_use"] == 0


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_adapter_cannot_stop_the_engine_thread(fake_run_dir, tmp_path, kind):
    shutil.copytree(fake_run_dir, tmp_path / "run")
    write_corrupt_adapter(fake_run_dir / "experts" / "expert-00000", tmp_path / "run" / "experts" / "expert-00007",
                          kind)
    engine = engine_for_run(tmp_path / "run", EngineConfig(max_batch=4, max_seq_len=64)).start()
    try:
        for _ in range(2):  # a second request takes the cached-failure path
            with pytest.raises(AdapterError, match="expert-00007"):
                engine.generate("a", "expert-00007", _greedy(3), timeout=20)
        assert engine.generate("a", "expert-00001", _greedy(3), timeout=20).finish_reason == "length"
        assert engine.is_running and not engine.is_dead
    finally:
        engine.close()


def test_a_failing_step_fails_what_is_in_flight_and_three_in_a_row_stop_the_engine(fake_run_dir, monkeypatch):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=4, max_seq_len=64))
    admit, calls = engine._admit, []

    def admit_failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("scheduler bug")
        admit()

    monkeypatch.setattr(engine, "_admit", admit_failing_once)
    events, _ = _collect(engine, "a", None, _greedy(3))
    engine.start()
    try:
        deadline = time.monotonic() + 20
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(events[-1], Failed) and "RuntimeError" in events[-1].error.message
        assert engine.generate("a", None, _greedy(3), timeout=20).finish_reason == "length"  # it kept serving

        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("broken for good")))
        deadline = time.monotonic() + 20
        while not engine.is_dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.is_dead and "broken for good" in engine.failure
        with pytest.raises(Overloaded, match="restart the server"):
            engine.submit([5], None, _greedy(2))
    finally:
        engine.close()


def test_a_lone_request_knows_its_forwards_and_merges_its_adapter_at_once(fake_run_dir):
    config = EngineConfig(max_batch=8, prefill_chunk=4, max_seq_len=64, merge_single_adapter=True)
    merging = engine_for_run(fake_run_dir, config)
    plain = engine_for_run(fake_run_dir, EngineConfig(max_batch=8, prefill_chunk=4, max_seq_len=64))
    merging.lora.batch.merge_after = 12
    layer = next(iter(merging.lora.layers.values()))
    for max_tokens, merges in ((12, True), (8, False)):  # runs at least 12 forwards long, and fewer (short prompt)
        _, request = _collect(merging, PROMPTS[4], "expert-00002", _greedy(max_tokens))
        expected = request.forwards_left(config.prefill_chunk)
        merging.step()
        assert (layer._merged_slot >= 0) is merges  # decided on the first forward, not after a streak
        assert 1 + merging.run_until_idle() == expected == -(-len(merging.encode(PROMPTS[4])) // 4) + max_tokens - 1
        assert request.generated == _alone(plain, PROMPTS[4], "expert-00002", _greedy(max_tokens))
        for each in merging.lora.layers.values():
            each.forget_merge(each._merged_slot)
    merging.close()
    plain.close()
