"""Model "auto" with `top_k` and the out-of-domain guard, end to end through the official `openai` client, with the
introvert run's own router (`EmbeddingRouter.decide`) behind serving's `MixingRouter` protocol."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from upcycle.introvert.config import RoutingConfig
from upcycle.introvert.router import CentroidRouter, EmbeddingRouter, Guard
from upcycle.introvert.serving import engine_for_run
from upcycle.serving.config import EngineConfig, ServerConfig
from upcycle.serving.router import MixingRouter, RouteDecision, route_requests
from upcycle.serving.sampling import SamplingParams
from upcycle.serving.server import CONFIDENCE_HEADER, EXPERT_HEADER, IN_DOMAIN_HEADER, create_app

KEY = "test-key"
CENTROIDS = np.eye(4, 8, dtype=np.float32)  # one unit centroid per expert of the fake run


class TopicEmbedder:
    """'topic N' lands near centroid N, a little towards N+1 (so N+1 is second nearest); other text lands far from
    every centroid (orthogonal to all: d² = 2)."""

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            topic = next((n for n in range(4) if f"topic {n}" in text), None)
            if topic is None:
                rows.append(np.r_[np.zeros(4), np.ones(4)])
            else:
                rows.append(CENTROIDS[topic] + 0.8 * CENTROIDS[(topic + 1) % 4] + 0.2 * CENTROIDS[(topic + 2) % 4])
        return np.stack(rows).astype(np.float32)


def topic_router(config: RoutingConfig) -> EmbeddingRouter:
    validation = np.sort(np.random.default_rng(0).uniform(0.0, 0.5, 100))  # in-domain distances below 0.5
    return EmbeddingRouter(TopicEmbedder(), CentroidRouter(CENTROIDS), config, Guard(1.0, validation))


@pytest.fixture(scope="module")
def served(fake_run_dir, one_torch_thread, live_server):
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=6, max_seq_len=128))
    router = topic_router(RoutingConfig(top_k=1, temperature=1.0))
    live = live_server(create_app(engine, ServerConfig(api_key=KEY), router))
    yield live, engine, router
    live.stop()
    engine.close()


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _complete(client: openai.OpenAI, model: str, prompt: str, **extra):
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                                      extra_body={"ignore_eos": True, **extra})
    return raw.headers, raw.parse()


def test_the_introvert_router_is_a_mixing_router(served):
    router = served[2]
    assert isinstance(router, MixingRouter)
    [decision] = route_requests(router, ["about topic 1"], 3)
    assert decision.experts == ("expert-00001", "expert-00002", "expert-00003") and decision.in_domain
    assert sum(decision.weights) == pytest.approx(1.0) and decision.weights[0] > decision.weights[1]


def test_top_k_mixes_the_nearest_experts_exactly_as_the_engine_does(client, served):
    _, engine, router = served
    headers, completion = _complete(client, "auto", "a question about topic 2", top_k=2)
    [route] = router.decide(["a question about topic 2"], 2)
    assert headers[EXPERT_HEADER] == "expert-00002,expert-00003" == completion.model_extra["expert"]
    assert completion.model_extra["experts"] == ["expert-00002", "expert-00003"]
    assert completion.model_extra["weights"] == pytest.approx(list(route.weights))
    assert headers[IN_DOMAIN_HEADER] == "true" and completion.model_extra["in_domain"] is True
    assert float(headers[CONFIDENCE_HEADER]) == pytest.approx(completion.model_extra["confidence"], abs=1e-4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = engine.generate("a question about topic 2", list(route.experts), params, weights=route.weights)
    assert completion.choices[0].text == expected.text
    alone = engine.generate("a question about topic 2", "expert-00002", params)
    assert expected.token_ids != alone.token_ids  # sanity: the mixture is not the nearest expert alone


def test_top_k_1_is_the_nearest_expert_unchanged(client):
    _, named = _complete(client, "expert-00003", "tell me about topic 3")
    for extra in ({}, {"top_k": 1}):
        headers, routed = _complete(client, "auto", "tell me about topic 3", **extra)
        assert headers[EXPERT_HEADER] == "expert-00003" and routed.model_extra["weights"] == [1.0]
        assert routed.choices[0].text == named.choices[0].text


def test_out_of_domain_requests_go_to_the_base_and_say_so(client):
    _, base = _complete(client, "base", "the weather in Lisbon")
    headers, routed = _complete(client, "auto", "the weather in Lisbon", top_k=2)
    assert headers[EXPERT_HEADER] == "base" and headers[IN_DOMAIN_HEADER] == "false"
    assert routed.model_extra["experts"] == [] and routed.model_extra["in_domain"] is False
    assert routed.model_extra["confidence"] == 0.0 and float(headers[CONFIDENCE_HEADER]) == 0.0
    assert routed.choices[0].text == base.choices[0].text


def test_streamed_chat_mixture_equals_the_non_streamed_one(client):
    args = dict(model="auto", messages=[{"role": "user", "content": "topic 1 please"}], max_tokens=6, temperature=0,
                extra_body={"top_k": 3, "ignore_eos": True})
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.model_extra["expert"] == "expert-00001,expert-00002,expert-00003"
    assert all(c.model_extra["expert"] == whole.model_extra["expert"] for c in chunks)


@pytest.mark.parametrize(("model", "top_k", "needle"), [
    ("auto", 5, "between 1 and the number of experts (4)"), ("expert-00001", 2, "applies to model 'auto' only"),
    ("base", 3, "applies to model 'auto' only"), ("auto", 0, "top_k")])
def test_a_top_k_the_server_cannot_honour_is_a_one_line_400(client, model, top_k, needle):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt="topic 1", max_tokens=1, extra_body={"top_k": top_k})
    body = error.value.body
    assert body["param"] == "top_k" and needle in body["message"] and "\n" not in body["message"]


def test_a_route_only_router_serves_top_k_1_and_refuses_more(fake_run_dir, stub_router, one_torch_thread):
    from fastapi.testclient import TestClient

    assert not isinstance(stub_router, MixingRouter)
    assert route_requests(stub_router, ["topic 2"]) == [RouteDecision(("expert-00002",), (1.0,))]
    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=2, max_seq_len=64))
    try:
        with TestClient(create_app(engine, ServerConfig(), stub_router)) as http:
            one = http.post("/v1/completions", json={"model": "auto", "prompt": "topic 2", "max_tokens": 1,
                                                     "top_k": 1})
            two = http.post("/v1/completions", json={"model": "auto", "prompt": "topic 2", "max_tokens": 1,
                                                     "top_k": 2})
    finally:
        engine.close()
    assert one.status_code == 200 and one.headers[EXPERT_HEADER] == "expert-00002"
    assert CONFIDENCE_HEADER not in one.headers and one.json()["confidence"] is None
    assert two.status_code == 400 and two.json()["error"]["param"] == "top_k"
    assert "picks one expert per request" in two.json()["error"]["message"]


def test_a_mixture_wider_than_the_batch_is_refused(fake_run_dir, one_torch_thread):
    from fastapi.testclient import TestClient

    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=2, max_seq_len=64))
    try:
        with TestClient(create_app(engine, ServerConfig(), topic_router(RoutingConfig()))) as http:
            reply = http.post("/v1/completions", json={"model": "auto", "prompt": "topic 0", "max_tokens": 1,
                                                       "top_k": 3})
    finally:
        engine.close()
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "top_k"
    assert "--engine.max_batch" in reply.json()["error"]["message"]


# -- a clustered run served with --routing.* ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered_run(tmp_path_factory, tiny_llama_dir):
    """A run clustered (tf-idf, K=2) from a small corpus, with a random expert per cluster instead of training."""
    from tests.run_helpers import cluster_args, make_corpus

    from upcycle.cli import main
    from upcycle.introvert.serving import write_synthetic_run

    run = tmp_path_factory.mktemp("runs") / "clustered"
    assert main(cluster_args(make_corpus(tmp_path_factory.mktemp("corpus")), tiny_llama_dir, run)) == 0
    write_synthetic_run(run, tiny_llama_dir, 2, rank=4, lora_alpha=8, b_std=0.2)
    return run


def test_a_run_is_served_with_its_routing_settings(clustered_run):
    from upcycle.introvert.serving import served_run

    text = ["import json\njson.dumps({'a': 1})"]
    mixing = served_run(clustered_run, routing=RoutingConfig(top_k=2, guard_percentile=None)).router
    [decision] = route_requests(mixing, text)  # the config's top_k is the default
    assert sorted(decision.experts) == ["expert-00000", "expert-00001"] and decision.confidence is None
    guarded = served_run(clustered_run, routing=RoutingConfig(guard_percentile=50.0)).router
    assert 0 < guarded.guard.threshold <= 4  # calibrated on the run's validation documents
    strict = served_run(clustered_run, routing=RoutingConfig(guard_threshold=0.0)).router  # nothing is that near
    [to_base] = route_requests(strict, text, 2)
    assert to_base.experts == () and not to_base.in_domain and to_base.confidence is not None
    lenient = served_run(clustered_run, routing=RoutingConfig(guard_threshold=0.0, out_of_domain="mixture")).router
    [to_mixture] = route_requests(lenient, text, 1)
    assert len(to_mixture.experts) == 2 and not to_mixture.in_domain


@pytest.mark.parametrize(("flags", "needle"), [
    (["--routing.guard_threshold", "5"], "lie in [0, 4]"), (["--routing.top_k", "0"], "--routing.top_k must be"),
    (["--routing.out_of_domain", "nowhere"], "choose one of base, mixture")])
def test_bad_routing_flags_are_one_line_errors(clustered_run, capsys, flags, needle):
    from tests.run_helpers import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, ["serve", str(clustered_run), *flags])
    assert_one_line_error(code, err, needle)
