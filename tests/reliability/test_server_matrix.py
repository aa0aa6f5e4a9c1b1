"""Hostile and valid requests against a live server: each gets the right status and a JSON error without a traceback,
and the server answers a valid request afterwards (issue 11, items 1-9), plus a hypothesis fuzz of request bodies.

The served run holds four corrupt experts next to three good ones (`CORRUPTIONS`), registered from its directory at
startup, as `upcycle serve` would.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import KeywordRouter, LiveServer
from upcycle.introvert.serving import engine_for_run, write_synthetic_run
from upcycle.serving.config import EngineConfig, ServerConfig
from upcycle.serving.engine import Engine
from upcycle.serving.server import admin_check, create_app
from upcycle.serving.synthetic import CORRUPTIONS, write_corrupt_adapter

KEY, ADMIN = "inference-key", "admin-key"
BODY_LIMIT = 64 * 1024
CORRUPT = {kind: f"expert-{10 + i:05d}" for i, kind in enumerate(CORRUPTIONS)}  # expert-00010 ...
VALID = {"model": "base", "prompt": "def f(x):", "max_tokens": 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """Three good experts (expert-00000..2) and one corrupt expert per kind (expert-00010..13)."""
    path = tmp_path_factory.mktemp("hostile-run")
    write_synthetic_run(path, tiny_llama_dir, 3, rank=4, lora_alpha=8, b_std=0.2)
    for kind, expert in CORRUPT.items():
        write_corrupt_adapter(path / "experts" / "expert-00000", path / "experts" / expert, kind)
    return path


def _engine(run_dir: Path) -> Engine:
    return engine_for_run(run_dir, EngineConfig(max_batch=4, max_seq_len=128, max_waiting=64, default_max_tokens=8))


@pytest.fixture(scope="module")
def server(run_dir, one_torch_thread):
    engine = _engine(run_dir)
    config = ServerConfig(api_key=KEY, admin_key=ADMIN, local_only=False, adapter_roots=(str(run_dir),),
                          max_body_bytes=BODY_LIMIT, max_prompt_tokens=64, max_tokens_limit=16)
    live = LiveServer(create_app(engine, config, router=KeywordRouter()))
    yield live, engine
    live.stop()
    engine.close()


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _send(base: str, method: str, path: str, body: Any = None, raw: bytes | None = None, key: str | None = KEY,
          timeout: float = 30) -> httpx.Response:
    content = raw if raw is not None else None if body is None else json.dumps(body, allow_nan=True).encode()
    headers = {**_auth(key), "Content-Type": "application/json"}
    return httpx.request(method, base + path, content=content, headers=headers, timeout=timeout)


def _assert_clean(response: httpx.Response) -> dict | None:
    """The answer is JSON (an error object when it is an error) and shows no Python internals."""
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert events and (events[-1] == "[DONE]" or "error" in json.loads(events[-1])), text[-500:]
        return None
    if response.headers.get("content-type", "").startswith("text/plain"):  # /metrics
        assert response.status_code == 200
        return None
    body = response.json()
    if response.status_code >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
    return body


def _still_serves(base: str) -> None:
    response = _send(base, "POST", "/v1/completions", VALID)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")


@dataclass
class Case:
    """One request of the matrix and what the server must answer."""

    name: str
    path: str
    body: Any = None
    raw: bytes | None = None
    status: int = 200
    code: str | None = None
    method: str = "POST"
    key: str | None = KEY
    tags: list[str] = field(default_factory=list)


def _completion(**fields) -> dict:
    return {**VALID, **fields}


def _chat(content: Any = "hi", **fields) -> dict:
    return {"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def _deep(levels: int) -> bytes:
    return b'{"model": "base", "prompt": ' + b"[" * levels + b"]" * levels + b"}"


CASES = [
    # -- valid requests, and what already worked ---------------------------------------------------------------------
    Case("completion", "/v1/completions", _completion()),
    Case("completion-expert", "/v1/completions", _completion(model="expert-00001")),
    Case("completion-auto", "/v1/completions", _completion(model="auto", prompt="about topic 2")),
    Case("completion-token-ids", "/v1/completions", _completion(prompt=[1, 2, 3])),
    Case("completion-two-prompts", "/v1/completions", _completion(prompt=["a", "b"])),
    Case("completion-stream", "/v1/completions", _completion(stream=True)),
    Case("completion-unicode", "/v1/completions", _completion(prompt="h\u00e9llo \U0001f642 \u4e16\u754c")),
    Case("completion-stop", "/v1/completions", _completion(stop=["\n", "x"])),
    Case("completion-seed-max", "/v1/completions", _completion(seed=2**64 - 1, temperature=1.0)),
    Case("completion-seed-negative", "/v1/completions", _completion(seed=-1, temperature=1.0)),
    Case("completion-tiny-temperature", "/v1/completions", _completion(temperature=1e-300)),
    Case("completion-unknown-field", "/v1/completions", _completion(frobnicate={"a": [1]})),
    Case("chat", "/v1/chat/completions", _chat()),
    Case("chat-stream", "/v1/chat/completions", _chat(stream=True)),
    Case("models", "/v1/models", method="GET"),
    Case("health", "/health", method="GET", key=None),
    Case("ready", "/ready", method="GET", key=None),
    Case("metrics-with-key", "/metrics", method="GET"),
    Case("admin-list", "/admin/experts", method="GET", key=ADMIN),
    # -- item 1: corrupt adapters fail their own requests ------------------------------------------------------------
    *[Case(f"corrupt-{kind}", "/v1/completions", _completion(model=expert), status=500, code="adapter_load_failed")
      for kind, expert in CORRUPT.items()],
    Case("corrupt-stream", "/v1/completions", _completion(model=CORRUPT["rank_zero"], stream=True), status=500,
         code="adapter_load_failed"),
    Case("corrupt-chat", "/v1/chat/completions", _chat(model=CORRUPT["nested_header"]), status=500,
         code="adapter_load_failed"),
    # -- item 2: token ids the model does not have -------------------------------------------------------------------
    Case("ids-too-large", "/v1/completions", _completion(prompt=[999_999]), status=400),
    Case("ids-negative", "/v1/completions", _completion(prompt=[-7]), status=400),
    Case("ids-vocab-size", "/v1/completions", _completion(prompt="VOCAB"), status=400),
    Case("ids-huge", "/v1/completions", _completion(prompt=[2**70]), status=400),
    Case("ids-one-bad-prompt-of-two", "/v1/completions", _completion(prompt=[[1, 2], [999_999]]), status=400),
    Case("ids-stream", "/v1/completions", _completion(prompt=[-1], stream=True), status=400),
    # -- item 3: 400 rather than 500 ---------------------------------------------------------------------------------
    Case("surrogate-prompt", "/v1/completions", raw=b'{"model": "base", "prompt": "a\\ud800b"}', status=400),
    Case("surrogate-prompt-list", "/v1/completions", raw=b'{"model": "base", "prompt": ["\\udfff"]}', status=400),
    Case("surrogate-chat", "/v1/chat/completions",
         raw=b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}', status=400),
    Case("surrogate-model", "/v1/completions", raw=b'{"model": "\\ud800", "prompt": "x"}', status=400),
    Case("surrogate-stop", "/v1/completions", raw=b'{"model": "base", "prompt": "x", "stop": "\\ud800"}', status=400),
    Case("surrogate-key", "/v1/completions", raw=b'{"model": "base", "prompt": "x", "\\ud800": 1}', status=400),
    Case("seed-2**70", "/v1/completions", _completion(seed=2**70), status=400),
    Case("seed--2**70", "/v1/completions", _completion(seed=-(2**70)), status=400),
    Case("temperature-nan", "/v1/completions", raw=b'{"model": "base", "prompt": "x", "temperature": NaN}',
         status=400),
    Case("top-p-infinity", "/v1/completions", raw=b'{"model": "base", "prompt": "x", "top_p": Infinity}', status=400),
    Case("max-tokens-huge", "/v1/completions", _completion(max_tokens=10**30), status=400),
    Case("max-tokens-zero", "/v1/completions", _completion(max_tokens=0), status=400),
    Case("n-2", "/v1/completions", _completion(n=2), status=400),
    Case("logprobs", "/v1/completions", _completion(logprobs=5), status=400),
    Case("stream-two-prompts", "/v1/completions", _completion(prompt=["a", "b"], stream=True), status=400),
    Case("prompt-too-long", "/v1/completions", _completion(prompt="word " * 200), status=400,
         code="context_length_exceeded"),
    Case("prompt-empty-list", "/v1/completions", _completion(prompt=[]), status=400),
    Case("prompt-wrong-type", "/v1/completions", _completion(prompt={"a": 1}), status=400),
    Case("chat-no-messages", "/v1/chat/completions", _chat() | {"messages": []}, status=400),
    Case("chat-image-part", "/v1/chat/completions", _chat([{"type": "image_url", "image_url": "x"}]), status=400),
    Case("not-json", "/v1/completions", raw=b'{"model": "base", "prompt": ', status=400),
    Case("json-array", "/v1/completions", raw=b"[1, 2]", status=400),
    Case("empty-body", "/v1/completions", raw=b"", status=400),
    Case("deeply-nested", "/v1/completions", raw=_deep(30_000), status=400),
    # -- item 4: body size -------------------------------------------------------------------------------------------
    Case("body-too-large", "/v1/completions", _completion(prompt="x" * (BODY_LIMIT + 1)), status=413,
         code="body_too_large"),
    Case("body-too-large-chat", "/v1/chat/completions", _chat("y" * 2 * BODY_LIMIT), status=413),
    # -- item 5: keys, adapter roots, open documentation -------------------------------------------------------------
    Case("no-key", "/v1/completions", _completion(), status=401, key=None),
    Case("wrong-key", "/v1/completions", _completion(), status=401, key="guess"),
    Case("admin-with-inference-key", "/admin/experts", method="GET", status=401),
    Case("admin-delete-with-inference-key", "/admin/experts/expert-00001", method="DELETE", status=401),
    Case("admin-add-with-inference-key", "/admin/experts", {"id": "x", "path": "/etc"}, status=401),
    Case("admin-add-etc-passwd", "/admin/experts", {"id": "pw", "path": "/etc/passwd"}, status=403, key=ADMIN),
    Case("admin-add-missing", "/admin/experts", {"id": "pw", "path": "/etc/no-such-file"}, status=403, key=ADMIN),
    Case("admin-add-traversal", "/admin/experts", {"id": "pw", "path": "RUN/../../../etc"}, status=403, key=ADMIN),
    Case("admin-add-nul", "/admin/experts", {"id": "pw", "path": "RUN/experts/\u0000"}, status=403, key=ADMIN),
    Case("admin-add-corrupt-config", "/admin/experts", {"id": "bad", "path": "RUN/experts/expert-00013"}, status=400,
         key=ADMIN),
    Case("admin-add-bad-id", "/admin/experts", {"id": "../x", "path": "RUN/experts/expert-00001"}, status=400,
         key=ADMIN),
    Case("admin-add-surrogate-id", "/admin/experts", raw=b'{"id": "\\ud800", "path": "/x"}', status=400, key=ADMIN),
    Case("metrics-no-key", "/metrics", method="GET", status=401, key=None),
    Case("docs", "/docs", method="GET", status=404, key=None),
    Case("openapi", "/openapi.json", method="GET", status=404, key=None),
    Case("redoc", "/redoc", method="GET", status=404, key=None),
    # -- the rest of the surface -------------------------------------------------------------------------------------
    Case("unknown-model", "/v1/completions", _completion(model="expert-77777"), status=404, code="model_not_found"),
    Case("unknown-route", "/v2/anything", method="GET", status=404),
    Case("wrong-method", "/v1/completions", method="GET", status=405),
]


def _resolve(case: Case, run_dir: Path, engine: Engine) -> Case:
    """Fill in what a case can only know at run time (the run's path, the vocabulary size)."""
    body = case.body
    if isinstance(body, dict):
        body = {k: (str(v).replace("RUN", str(run_dir)) if k == "path" else v) for k, v in body.items()}
        if body.get("prompt") == "VOCAB":
            body["prompt"] = [engine.vocab_size]
    return Case(**{**case.__dict__, "body": body})


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matrix(server, run_dir, case):
    live, engine = server
    case = _resolve(case, run_dir, engine)
    response = _send(live.base_url, case.method, case.path, case.body, case.raw, case.key)
    assert response.status_code == case.status, response.text[:500]
    body = _assert_clean(response)
    if case.code is not None:
        assert body["error"]["code"] == case.code, body
    _still_serves(live.base_url)
    assert engine.is_running and httpx.get(live.base_url + "/health").json() == {"status": "ok"}


def test_refused_paths_say_nothing_about_whether_they_exist(server):
    live, _ = server
    answers = {_send(live.base_url, "POST", "/admin/experts", {"id": "pw", "path": path}, key=ADMIN).text
               for path in ("/etc/passwd", "/etc/no-such-file", "/root/.ssh/id_rsa", "/proc/self/environ")}
    assert len(answers) == 1


def test_a_symlink_out_of_the_adapter_root_is_refused(server, run_dir):
    live, _ = server
    link = run_dir / "escape"
    link.symlink_to("/etc")
    try:
        response = _send(live.base_url, "POST", "/admin/experts", {"id": "esc", "path": str(link)}, key=ADMIN)
        assert response.status_code == 403
    finally:
        link.unlink()


def test_admin_is_off_beyond_localhost_without_its_own_key(server):
    assert admin_check(ServerConfig(api_key=KEY, local_only=False)) is None
    assert admin_check(ServerConfig(api_key=KEY, local_only=True)) is not None  # localhost: as before
    assert admin_check(ServerConfig(api_key=KEY, admin_key=ADMIN, local_only=False)) is not None
    from fastapi.testclient import TestClient

    app = create_app(server[1], ServerConfig(api_key=KEY, local_only=False))
    client = TestClient(app)  # no lifespan: the routes only
    assert client.get("/admin/experts", headers=_auth(KEY)).status_code == 404


def test_auto_routed_to_a_removed_expert_answers_503_with_a_reason(server, run_dir):
    """Item 6: the router still picks the deleted expert; the client learns why and what to do."""
    live, _ = server
    assert _send(live.base_url, "DELETE", "/admin/experts/expert-00002", key=ADMIN).status_code == 200
    try:
        for stream in (False, True):
            response = _send(live.base_url, "POST", "/v1/completions",
                             _completion(model="auto", prompt="about topic 2", stream=stream))
            assert response.status_code == 503, response.text
            error = _assert_clean(response)["error"]
            assert error["code"] == "expert_unavailable" and "expert-00002" in error["message"]
        assert _send(live.base_url, "POST", "/v1/completions",
                     _completion(model="auto", prompt="about topic 1")).status_code == 200
    finally:
        added = _send(live.base_url, "POST", "/admin/experts",
                      {"id": "expert-00002", "path": str(run_dir / "experts" / "expert-00002")}, key=ADMIN)
        assert added.status_code == 201, added.text


def test_tokenizing_a_long_prompt_does_not_block_health(server, monkeypatch):
    """Item 4: tokenizing runs on a worker thread; /health answers meanwhile."""
    live, engine = server
    encode = engine.encode

    def slow_encode(text: str) -> list[int]:
        time.sleep(4.0)  # stands for a multi-megabyte prompt
        return encode(text)

    monkeypatch.setattr(engine, "encode", slow_encode)
    caller = threading.Thread(target=_send, args=(live.base_url, "POST", "/v1/completions", _completion()))
    caller.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert httpx.get(live.base_url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 2.0  # on the event loop it would wait for the 4 s "tokenisation"
    caller.join(timeout=30)


def test_health_and_ready_report_a_dead_engine(run_dir, monkeypatch):
    """Item 1: when the engine gives up, /health and /ready say so, and requests get a 503 at once, not a hang."""
    engine = _engine(run_dir)
    live = LiveServer(create_app(engine, ServerConfig()))
    try:
        assert _send(live.base_url, "POST", "/v1/completions", VALID).status_code == 200
        monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("broken scheduler")))
        deadline = time.monotonic() + 20
        while not engine.is_dead and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(live.base_url + "/health")
        assert health.status_code == 503 and "broken scheduler" in health.json()["reason"]
        assert httpx.get(live.base_url + "/ready").json()["status"] == "dead"
        response = _send(live.base_url, "POST", "/v1/completions", VALID, timeout=10)
        assert response.status_code == 503 and "restart the server" in _assert_clean(response)["error"]["message"]
    finally:
        live.stop()
        engine.close()


def test_shutdown_answers_json_503_and_ends_streams_with_an_error_event(run_dir, monkeypatch):
    """Item 7: requests still running when the drain timeout ends get a JSON 503 / a last SSE error event."""
    engine = _engine(run_dir)
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.05), step())[1])  # 100 tokens take ~5 s
    live = LiveServer(create_app(engine, ServerConfig()), drain_timeout_s=1.0)
    long = _completion(max_tokens=100, ignore_eos=True)
    answers: dict[str, httpx.Response] = {}

    def call(name: str, body: dict) -> None:
        answers[name] = _send(live.base_url, "POST", "/v1/completions", body)

    callers = [threading.Thread(target=call, args=("plain", long)),
               threading.Thread(target=call, args=("stream", {**long, "stream": True}))]
    for caller in callers:
        caller.start()
    deadline = time.monotonic() + 20
    while len(engine.running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    live.stop()  # as SIGTERM does
    for caller in callers:
        caller.join(timeout=30)
    plain, stream = answers["plain"], answers["stream"]
    assert plain.status_code == 503 and plain.headers["content-type"] == "application/json"
    assert _assert_clean(plain)["error"]["code"] == "unavailable"
    assert stream.status_code == 200
    last = [line for line in stream.text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "unavailable"
    engine.close()


# -- fuzz: no request body may get a 500 or hang the engine -----------------------------------------------------------
def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` about nine times in ten: most bodies should get past validation and into the engine. (Not `one_of`,
    which flattens the branches of `bad` and would pick it most of the time.)"""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: good if ok else bad)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
                 st.lists(st.integers(0, 50), max_size=3), st.dictionaries(st.text(max_size=5), st.integers()))
_TEXT = _mostly(st.text(max_size=30), st.sampled_from(["\ud800", "a\udfffb", "\U0001f642", "", "\x00"]) | _ANY)
_IDS = st.lists(_mostly(st.integers(0, 400), st.integers(-5, 600) | st.integers(-(2**70), 2**70)), max_size=6)
_MODELS = _mostly(st.sampled_from(["base", "auto", "expert-00000", "expert-00001"]),
                  st.sampled_from(["expert-99999", "\ud800", ""]) | _ANY)
_OPTIONAL = {
    "max_tokens": _mostly(st.integers(1, 6), st.integers(-2, 40) | _ANY),
    "temperature": _mostly(st.floats(0, 2), st.floats() | _ANY),
    "top_p": _mostly(st.floats(0.01, 1), st.floats() | _ANY),
    "seed": _mostly(st.integers(0, 2**64 - 1), st.integers(-(2**70), 2**70) | _ANY),
    "stop": _mostly(st.lists(st.text(min_size=1, max_size=3), max_size=4), st.lists(_TEXT, max_size=6) | _ANY),
    "stream": _mostly(st.booleans(), _ANY),
    "stream_options": _mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), _ANY),
    "n": _mostly(st.just(1), st.integers(-1, 3) | _ANY),
    "ignore_eos": _mostly(st.booleans(), _ANY),
    "echo": _ANY, "logit_bias": _ANY, "user": _TEXT,
    "extra": st.recursive(_ANY, lambda inner: st.lists(inner, max_size=3), max_leaves=8),
}
_PROMPT = _mostly(st.one_of(_TEXT, st.lists(_TEXT, min_size=1, max_size=3), _IDS, st.lists(_IDS, min_size=1,
                                                                                           max_size=3)), _ANY)
_COMPLETION = st.fixed_dictionaries({"model": _MODELS, "prompt": _PROMPT}, optional=_OPTIONAL)
_ROLES = _mostly(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["robot", ""]) | _ANY)
_MESSAGES = _mostly(st.lists(st.fixed_dictionaries({"role": _ROLES, "content": _TEXT}), min_size=1, max_size=3), _ANY)
_CHAT = st.fixed_dictionaries({"model": _MODELS, "messages": _MESSAGES},
                              optional={**_OPTIONAL, "max_completion_tokens": _mostly(st.integers(1, 6), _ANY)})


@settings(max_examples=80, deadline=timedelta(seconds=30), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(st.tuples(st.just("/v1/completions"), _COMPLETION),
                 st.tuples(st.just("/v1/chat/completions"), _CHAT)))
def test_fuzzed_bodies_never_get_a_500_or_hang(server, request_body):
    live, engine = server
    path, body = request_body
    response = _send(live.base_url, "POST", path, body, timeout=20)  # a hang shows as a timeout error
    assert response.status_code < 500, (body, response.text[:500])
    _assert_clean(response)
    assert engine.is_running


def test_the_server_serves_after_the_fuzz(server):
    _still_serves(server[0].base_url)


# -- items 8 and 9: `upcycle serve` refuses bad flags and a missing extra in one line ---------------------------------
@pytest.mark.parametrize(("flags", "named"), [
    (["--engine.max_batch", "0"], "--engine.max_batch"), (["--engine.dtype", "int8"], "--engine.dtype"),
    (["--port", "70000"], "--port"), (["--port", "0"], "--port"),
    (["--engine.cache.cpu_max_adapters", "0"], "--engine.cache.cpu_max_adapters"),
    (["--engine.n_slots", "2"], "--engine.n_slots"), (["--engine.max_waiting", "-1"], "--engine.max_waiting"),
    (["--engine.request_timeout_s", "0"], "--engine.request_timeout_s"),
    (["--server.request_timeout_s", "0"], "--server.request_timeout_s"),
    (["--engine.device", "tpu"], "--engine.device"), (["--engine.max_seq_len", "1"], "--engine.max_seq_len"),
    (["--engine.torch_threads", "0"], "--engine.torch_threads"),
    (["--engine.mixed_step_max_padding", "-1"], "--engine.mixed_step_max_padding"),
    (["--log_level", "loud"], "--log_level"), (["--server.max_body_bytes", "0"], "--server.max_body_bytes"),
    (["--server.api_key", "same", "--server.admin_key", "same"], "--server.admin_key"),
])
def test_bad_serve_flags_are_one_line_errors(run_dir, capsys, flags, named):
    from upcycle.cli import main

    assert main(["serve", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upcycle: error: ") and named in err and "\n" not in err, err


def test_serve_refuses_an_admin_key_from_the_environment_equal_to_the_api_key(run_dir, capsys, monkeypatch):
    from upcycle.cli import main

    monkeypatch.setenv("UPCYCLE_ADMIN_KEY", "same")
    assert main(["serve", str(run_dir), "--server.api_key", "same"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upcycle: error: ") and "--server.admin_key" in err and "\n" not in err, err


def test_serve_without_the_serve_extra_names_it(run_dir, capsys, monkeypatch):
    from upcycle.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails as if it were not installed
    assert main(["serve", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'upcycle[serve]'" in err and "uvicorn" in err and "\n" not in err, err

