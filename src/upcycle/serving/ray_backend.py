"""Ray Serve deployment: engine replicas behind Serve's proxy, with model multiplexing by expert id (optional).

Each replica runs the same OpenAI-compatible app as `upcycle serve` (one engine, all experts registered). Serve's
model multiplexing routes a request whose header `serve_multiplexed_model_id` names an expert to a replica that
already loaded it, so with R replicas each keeps a hot subset of the experts in its CPU and slot tiers; inside a
replica the engine still batches requests for different experts together. Requests without the header go to any
replica. (OpenAI clients add the header with `default_headers={"serve_multiplexed_model_id": "expert-00003"}` or
per call with `extra_headers`; "auto" requests are routed inside the replica, after Serve picked it.)

    from ray import serve
    serve.run(build_app("RUN"), route_prefix="/")
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from upcycle.serving.config import EngineConfig, ServerConfig


def build_app(run: str, engine_config: EngineConfig | None = None, server_config: ServerConfig | None = None,
              num_replicas: int = 1, experts_per_replica: int = 512, ray_actor_options: dict | None = None):
    """A Serve application of `num_replicas` engine replicas for `run` (a directory `open_source` reads, such as an
    introvert run); pass it to `serve.run`."""
    from ray import serve

    engine_config = engine_config or EngineConfig()
    server_config = server_config or ServerConfig()
    # Serve owns the replica's lifetime and the directory watch would race across replicas: keep both simple.
    # Admin may add adapters from the run only, unless the caller named other roots.
    server_config = replace(server_config, watch_dir=None, adapter_roots=server_config.adapter_roots or (run,))

    @serve.deployment(num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1})
    @serve.ingress()
    class Experts:
        def __init__(self) -> None:
            from upcycle.serving.engine import Engine
            from upcycle.serving.source import open_source

            served = open_source(run, router=False)
            self.engine = Engine.from_pretrained(served.base, served.experts, engine_config, served.loader)

        def __serve_build_asgi_app__(self):
            from upcycle.serving.server import create_app

            return create_app(self.engine, server_config, on_expert=self._on_expert)

        async def _on_expert(self, expert: str) -> None:
            if serve.get_multiplexed_model_id():
                await self.load_expert(expert)

        @serve.multiplexed(max_num_models_per_replica=experts_per_replica)
        async def load_expert(self, expert: str) -> str:
            """Bring `expert` into this replica's CPU tier; Serve then sends its requests here."""
            future = self.engine.cache.prefetch(expert)
            if future is not None:
                await asyncio.wrap_future(future)
            return expert

    return Experts.bind()
