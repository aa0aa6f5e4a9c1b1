"""Fixtures for serving tests: a fake run (tiny random Llama + a few random PEFT LoRA experts) and a stub router."""

from __future__ import annotations

from pathlib import Path

import pytest

N_EXPERTS = 4


@pytest.fixture(scope="session", autouse=True)
def _serving_uses_one_thread(one_torch_thread):
    """Every serving test runs with one intra-op thread (see the shared fixture)."""


@pytest.fixture(scope="session")
def fake_run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run directory with `N_EXPERTS` random r=4 LoRA experts on all projections (expert-00000 ...)."""
    from upcycle.introvert.serving import write_synthetic_run

    path = tmp_path_factory.mktemp("run")
    write_synthetic_run(path, tiny_llama_dir, N_EXPERTS, rank=4, lora_alpha=8, b_std=0.2, seed=0)
    return path


class KeywordRouter:
    """Stub `ExpertRouter`: the expert whose number appears first in the text (as 'topic N'), else expert-00000."""

    experts = [f"expert-{n:05d}" for n in range(N_EXPERTS)]

    def route(self, texts: list[str]) -> list[str]:
        out = []
        for text in texts:
            chosen = 0
            for n in range(N_EXPERTS):
                if f"topic {n}" in text:
                    chosen = n
                    break
            out.append(f"expert-{chosen:05d}")
        return out


@pytest.fixture(scope="session")
def stub_router() -> KeywordRouter:
    return KeywordRouter()


class LiveServer:
    """A uvicorn server for `app` on 127.0.0.1 at a free port, running in a thread."""

    def __init__(self, app, drain_timeout_s: float = 10.0) -> None:
        import socket
        import threading
        import time

        from upcycle.serving.server import make_server

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = make_server(app, "127.0.0.1", port, drain_timeout_s=drain_timeout_s, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.begin_shutdown()
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server() -> type[LiveServer]:
    """The LiveServer class (a fixture, so test modules need not import conftest)."""
    return LiveServer
