"""Serving knows no method: any {name: adapter dir} table and any ExpertRouter serve; introvert runs plug in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import upcycle.serving
from upcycle.errors import UserError
from upcycle.serving.config import EngineConfig, ServerConfig
from upcycle.serving.engine import Engine
from upcycle.serving.router import ExpertRouter, FixedRouter, load_router
from upcycle.serving.server import EXPERT_HEADER, create_app
from upcycle.serving.source import open_source
from upcycle.serving.synthetic import write_synthetic_experts

SERVING = Path(upcycle.serving.__file__).parent


def test_no_serving_module_imports_a_method():
    methods = ("upcycle.introvert", "upcycle.moe", "upcycle.masks")
    for path in sorted(SERVING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # function-local imports included
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith(methods)], f"{path.name} imports {names}"
    modules = sorted(p.stem for p in SERVING.glob("*.py") if p.stem != "__init__")
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n    importlib.import_module('upcycle.serving.' + name)\n"
              "print(sorted(m for m in sys.modules if m.startswith(('upcycle.introvert', 'upcycle.moe', "
              "'upcycle.masks'))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_introvert_run_is_served_through_its_adapter(fake_run_dir):
    import json

    served = open_source(fake_run_dir)
    assert served.base == json.loads((fake_run_dir / "run.json").read_text())["base"]
    assert sorted(served.experts) == [f"expert-{n:05d}" for n in range(4)]
    assert served.experts["expert-00002"] == fake_run_dir / "experts" / "expert-00002"
    assert served.router is None  # a synthetic run has no centroids
    assert served.experts_dir == fake_run_dir / "experts" and served.root == fake_run_dir


def test_any_adapter_table_and_router_serve(tmp_path, tiny_llama_dir, one_torch_thread):
    from fastapi.testclient import TestClient

    table = write_synthetic_experts(tmp_path / "adapters", tiny_llama_dir, 2, rank=4, name=lambda i: f"topic-{i}")
    assert sorted(table) == ["topic-0", "topic-1"] and all((p / "adapter_config.json").is_file() for p in
                                                           table.values())
    engine = Engine.from_pretrained(str(tiny_llama_dir), table, EngineConfig(max_batch=2, max_seq_len=64))
    router = FixedRouter("topic-1")
    assert isinstance(router, ExpertRouter)
    try:
        with TestClient(create_app(engine, ServerConfig(), router)) as client:
            models = [m["id"] for m in client.get("/v1/models").json()["data"]]
            reply = client.post("/v1/completions", json={"model": "auto", "prompt": "x", "max_tokens": 2})
    finally:
        engine.close()
    assert models == ["base", "auto", "topic-0", "topic-1"]
    assert reply.status_code == 200 and reply.headers[EXPERT_HEADER] == "topic-1"
    assert reply.json()["expert"] == "topic-1"


class _RouteOnly:
    def route(self, texts: list[str]) -> list[str]:
        return ["expert-00000"] * len(texts)


def route_only(path: str) -> _RouteOnly:
    return _RouteOnly()


def test_a_router_factory_must_return_an_expert_router():
    with pytest.raises(UserError, match="lacks route"):
        load_router(f"{__name__}:route_only", "anywhere")
    with pytest.raises(UserError, match="must look like"):
        load_router("no-colon", "anywhere")
