"""Wire-format helpers and text streaming: chat rendering, stop strings held back, top-p."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from upcycle.serving.protocol import FALLBACK_CHAT_STOP, CompletionRequest, render_chat
from upcycle.serving.sampling import SamplingParams, TextStream, sample_tokens

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_chat_fallback_and_template(tiny_tokenizer):
    text, stop, templated = render_chat(tiny_tokenizer, MESSAGES)
    assert text == "system: be brief\nuser: hi\nassistant:" and stop == [FALLBACK_CHAT_STOP] and not templated
    with_template = copy.deepcopy(tiny_tokenizer)
    with_template.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    text, stop, templated = render_chat(with_template, MESSAGES)
    assert text == "<system>be brief<user>hi<assistant>" and stop == [] and templated


def test_text_stream_holds_back_a_possible_stop_string(tiny_tokenizer):
    ids = tiny_tokenizer("hello world, and more", add_special_tokens=False)["input_ids"]
    stream = TextStream(tiny_tokenizer, stop=["world"])
    sent = "".join(stream.add(i) for i in ids)
    assert stream.stopped and sent == "hello "
    free = TextStream(tiny_tokenizer, stop=["worlds"])
    sent = "".join(free.add(i) for i in ids) + free.finish()
    assert not free.stopped and sent == "hello world, and more"


def test_text_stream_waits_for_complete_utf8(tiny_tokenizer):
    ids = tiny_tokenizer("naïve café ✓", add_special_tokens=False)["input_ids"]
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "naïve café ✓" and all("\ufffd" not in p for p in pieces)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([[4.0, 3.9, -5.0, -5.0]])
    params = SamplingParams(temperature=1.0, top_p=0.6)
    draws = {sample_tokens(logits, [params], [torch.Generator().manual_seed(s)])[0] for s in range(50)}
    assert draws == {0, 1}
    assert sample_tokens(logits, [SamplingParams(temperature=0)], [None]) == [0]


@pytest.mark.parametrize("body", [{"model": "base", "prompt": "a\ud800b"},
                                  {"model": "base", "prompt": ["x", "\udfff"]},
                                  {"model": "\ud800", "prompt": "x"},
                                  {"model": "base", "prompt": "x", "stop": "\ud800"},
                                  {"model": "base", "prompt": "x", "k\ud800": 1}])
def test_lone_surrogates_are_refused_at_validation(body):
    with pytest.raises(ValidationError, match="lone surrogate"):
        CompletionRequest.model_validate(body)
    assert CompletionRequest.model_validate({"model": "base", "prompt": "h\u00e9llo \U0001f642"}).prompt


@pytest.mark.parametrize(("seed", "valid"), [(0, True), (-(2**63), True), (2**64 - 1, True), (2**64, False),
                                             (2**70, False), (-(2**63) - 1, False)])
def test_seed_range_is_what_torch_takes(seed, valid):
    body = {"model": "base", "prompt": "x", "seed": seed}
    if valid:
        assert CompletionRequest.model_validate(body).seed == seed
        SamplingParams(seed=seed)
    else:
        with pytest.raises(ValidationError, match="seed"):
            CompletionRequest.model_validate(body)


def test_a_tiny_temperature_samples_the_top_token_instead_of_nan():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    params = [SamplingParams(temperature=1e-300)]
    assert sample_tokens(logits, params, [torch.Generator().manual_seed(0)]) == [1]
