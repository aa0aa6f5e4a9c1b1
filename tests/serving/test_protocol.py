"""Wire-format helpers and text streaming: chat rendering, stop strings held back, top-p."""

from __future__ import annotations

import copy

import torch

from upcycle.serving.protocol import FALLBACK_CHAT_STOP, render_chat
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
