"""Optional backends and tools: the bounded load test, the vLLM command, the Ray Serve deployment (slow)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from upcycle.introvert.serving import engine_for_run
from upcycle.serving.config import EngineConfig, ServerConfig
from upcycle.serving.server import create_app


def test_load_test_reports_no_errors_on_a_healthy_server(fake_run_dir, one_torch_thread, live_server):
    from upcycle.serving.loadtest import run_load

    engine = engine_for_run(fake_run_dir, EngineConfig(max_batch=4, max_seq_len=128, torch_threads=1))
    live = live_server(create_app(engine, ServerConfig(api_key="k")))
    try:
        result = asyncio.run(run_load(live.base_url + "/v1", "k", clients=6, seconds=2.0))
    finally:
        live.stop()
        engine.close()
    assert result["errors"] == 0 and result["outcomes"]["ok"] > 0 and result["generated_tokens"] > 0


def test_hostile_calls_get_their_errors_and_cost_valid_calls_nothing(fake_run_dir, tmp_path, one_torch_thread,
                                                                     live_server):
    import shutil

    from upcycle.serving.loadtest import HOSTILE_KINDS, run_load
    from upcycle.serving.synthetic import CORRUPTIONS, write_corrupt_adapter

    run = Path(shutil.copytree(fake_run_dir, tmp_path / "run"))
    corrupt = [f"expert-{90_000 + i:05d}" for i in range(len(CORRUPTIONS))]
    for name, kind in zip(corrupt, CORRUPTIONS, strict=True):
        write_corrupt_adapter(run / "experts" / "expert-00000", run / "experts" / name, kind)
    engine = engine_for_run(run, EngineConfig(max_batch=4, max_seq_len=128, torch_threads=1))
    live = live_server(create_app(engine, ServerConfig(api_key="k", max_body_bytes=4096)))
    try:
        result = asyncio.run(run_load(live.base_url + "/v1", "k", clients=6, seconds=3.0, hostile=0.3,
                                      corrupt_experts=corrupt, max_body_bytes=4096))
        assert engine.is_running
    finally:
        live.stop()
        engine.close()
    assert result["errors"] == 0 and result["outcomes"]["ok"] > 0
    assert result["hostile"]["calls"] > 0 and result["hostile"]["unexpected"] == 0, result["hostile"]
    assert {k.split(":")[0] for k in result["hostile"]["outcomes"]} <= set(HOSTILE_KINDS)


def test_vllm_command_points_the_filesystem_resolver_at_the_experts(fake_run_dir):
    from upcycle.serving.vllm_backend import vllm_command

    command = vllm_command(str(fake_run_dir))
    assert f"VLLM_LORA_RESOLVER_CACHE_DIR={fake_run_dir / 'experts'}" in command
    assert "--enable-lora" in command and "--max-lora-rank 4" in command


@pytest.mark.slow
def test_ray_serve_deployment_multiplexes_experts(fake_run_dir):
    import openai
    import ray
    from ray import serve

    from upcycle.serving.ray_backend import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(fake_run_dir), EngineConfig(max_batch=2, max_seq_len=128, torch_threads=1),
                            ray_actor_options={"num_cpus": 0.5}), route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=2, timeout=60)
        reply = client.completions.create(model="expert-00002", prompt="x", max_tokens=3,
                                          extra_headers={"serve_multiplexed_model_id": "expert-00002"})
        assert reply.model_extra["expert"] == "expert-00002" and reply.usage.completion_tokens == 3
        assert "expert-00003" in [m.id for m in client.models.list()]
    finally:
        serve.shutdown()
        ray.shutdown()
