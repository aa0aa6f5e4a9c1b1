"""End to end through the official `openai` client against uvicorn on 127.0.0.1: routing, streaming, errors, admin."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from upcycle.introvert.serving import engine_for_run
from upcycle.serving.adapters import WEIGHTS_NAME
from upcycle.serving.config import EngineConfig, ServerConfig
from upcycle.serving.server import EXPERT_HEADER, create_app

KEY = "test-key"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    """A second adapter root, beside the run, that admin may add experts from."""
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def served(fake_run_dir, adapters_dir, one_torch_thread, live_server, stub_router):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=4, max_seq_len=128, max_waiting=8))
    app = create_app(engine, ServerConfig(api_key=KEY, max_prompt_tokens=64, max_tokens_limit=100,
                                          adapter_roots=(str(fake_run_dir), str(adapters_dir))),
                     router=stub_router)
    live = live_server(app)
    yield live, engine
    live.stop()
    engine.close()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _post(served, path: str, content: bytes | None = None, json=None, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served[0].base_url + path, content=content, json=json, headers=headers, timeout=30)


def test_models_lists_base_auto_and_every_expert(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["base", "auto", "expert-00000", "expert-00001", "expert-00002", "expert-00003"]
    assert client.models.retrieve("expert-00002").id == "expert-00002"


def test_completion_names_its_expert_and_counts_usage(client, served):
    raw = client.completions.with_raw_response.create(model="expert-00001", prompt="def heapify(x):",
                                                      max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    completion = raw.parse()
    assert raw.headers[EXPERT_HEADER] == "expert-00001" and completion.model_extra["expert"] == "expert-00001"
    assert completion.usage.prompt_tokens == len(served[1].encode("def heapify(x):"))
    assert completion.usage.completion_tokens == 5 and completion.choices[0].finish_reason == "length"


def test_auto_routes_by_content_and_base_uses_no_adapter(client):
    routed = client.completions.create(model="auto", prompt="a question about topic 2", max_tokens=2)
    assert routed.model_extra["expert"] == "expert-00002" and routed.model == "auto"
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model_extra["expert"] == "base" and chat.choices[0].message.role == "assistant"
    routed_chat = client.chat.completions.create(model="auto", max_tokens=2,
                                                 messages=[{"role": "user", "content": "tell me about topic 3"}])
    assert routed_chat.model_extra["expert"] == "expert-00003"


def test_streaming_equals_non_streaming_and_reports_usage(client):
    args = dict(model="expert-00003", prompt="import json\n", max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"
    chat_args = dict(model="expert-00000", messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0)
    whole_chat = client.chat.completions.create(**chat_args).choices[0].message.content
    streamed = client.chat.completions.create(stream=True, **chat_args)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole_chat


def test_errors_are_openai_shaped_with_the_right_status(client, served):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="expert-77777", prompt="x", max_tokens=1)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served[0].base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.get(served[0].base_url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    malformed = _post(served, "/v1/completions", content=b'{"model": "base", "prompt": ')
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="base", prompt="word " * 200, max_tokens=1)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x", max_tokens=1, n=2)
    wrong_type = _post(served, "/v1/chat/completions", json={"model": "base", "messages": "hello"})
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "messages"


def test_full_queue_answers_429(client, served):
    engine = served[1]
    engine.config.max_waiting = 0  # every submission now finds the queue full
    try:
        with pytest.raises(openai.RateLimitError) as error:
            client.completions.create(model="base", prompt="x", max_tokens=1)
        assert error.value.response.headers["retry-after"] == "1"
    finally:
        engine.config.max_waiting = 8


def test_admin_adds_a_corrupt_expert_that_fails_alone(client, served, fake_run_dir, adapters_dir):
    broken = adapters_dir / "broken"
    shutil.copytree(fake_run_dir / "experts" / "expert-00000", broken)
    (broken / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    added = _post(served, "/admin/experts", json={"id": "expert-00042", "path": str(broken)})
    assert added.status_code == 201
    assert "expert-00042" in [m.id for m in client.models.list()]
    with pytest.raises(openai.InternalServerError) as error:
        client.completions.create(model="expert-00042", prompt="x", max_tokens=2)
    assert error.value.body["code"] == "adapter_load_failed" and "expert-00042" in error.value.body["message"]
    assert client.completions.create(model="expert-00001", prompt="x", max_tokens=2).choices  # others fine
    removed = httpx.delete(served[0].base_url + "/admin/experts/expert-00042",
                           headers={"Authorization": f"Bearer {KEY}"})
    assert removed.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="expert-00042", prompt="x", max_tokens=2)


def test_expert_removed_while_waiting_answers_410(client, served, monkeypatch, fake_run_dir):
    engine = served[1]
    admit = engine._admit
    held = threading.Event()

    def admit_all_but_expert_3():  # keep expert-00003's request waiting until the test lets go
        hold = [r for r in engine.waiting if r.expert == "expert-00003" and not held.is_set()]
        for r in hold:
            engine.waiting.remove(r)
        admit()
        engine.waiting.extendleft(reversed(hold))

    monkeypatch.setattr(engine, "_admit", admit_all_but_expert_3)
    outcome = {}

    def call():
        try:
            client.completions.create(model="expert-00003", prompt="x", max_tokens=2)
        except openai.APIStatusError as error:
            outcome["error"] = error

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while engine.queue_depth == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert httpx.delete(served[0].base_url + "/admin/experts/expert-00003",
                        headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    caller.join(timeout=10)
    held.set()
    assert outcome["error"].status_code == 410 and outcome["error"].body["code"] == "expert_removed"
    assert _post(served, "/admin/experts", json={"id": "expert-00003",
                                                 "path": str(fake_run_dir / "experts" / "expert-00003")}).is_success


def test_client_disconnect_mid_stream_cancels_the_request(served, monkeypatch):
    engine = served[1]
    step = engine.step

    def slow_step():  # 20 ms per step, so 100 tokens outlast the disconnect by far
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = engine.stats.requests.get("cancelled")
    body = {"model": "expert-00001", "prompt": "x", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served[0].base_url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        assert response.status_code == 200 and response.headers[EXPERT_HEADER] == "expert-00001"
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while engine.stats.requests.get("cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats.requests.get("cancelled") == before + 1
    assert not engine.running


def test_health_ready_and_metrics(served, client):
    base = served[0].base_url
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").status_code == 200
    client.completions.create(model="expert-00002", prompt="x", max_tokens=2)
    assert httpx.get(base + "/metrics").status_code == 401  # under the API key: it names every expert
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("upcycle_requests_total", "upcycle_tokens_total", "upcycle_generation_tokens_per_second",
                 "upcycle_queue_depth", "upcycle_adapter_cache_hits_total", "upcycle_adapter_swap_seconds_bucket",
                 'upcycle_http_requests_total{route="/v1/completions",status="200"}'):
        assert name in text, name


def test_graceful_shutdown_drains_in_flight_streams(fake_run_dir, one_torch_thread, monkeypatch, live_server):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=2, max_seq_len=128))
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.01), step())[1])
    # no key: fine on localhost; a drain long enough for 40 slow steps on a starved CPU
    live = live_server(create_app(engine, ServerConfig()), drain_timeout_s=60)
    lines: list[str] = []
    body = {"model": "expert-00000", "prompt": "x", "max_tokens": 40, "stream": True, "ignore_eos": True}

    def consume():
        with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=30) as response:
            lines.extend(line for line in response.iter_lines() if line)

    reader = threading.Thread(target=consume)
    reader.start()
    while not engine.running:
        time.sleep(0.005)
    live.stop()  # like SIGTERM: stop accepting, finish what runs, then stop the engine
    reader.join(timeout=30)
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert not engine.is_running
    with pytest.raises(httpx.ConnectError):
        httpx.get(live.base_url + "/health")
    engine.close()
