"""`upcycle serve`: the CLI's view of the serving package (a plain function; its signature is the command line)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket

from upcycle.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_ROUTER = "upcycle.introvert.routing:router_for_run"


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          router: str | None = None, max_batch: int = 16, max_waiting: int = 256, max_seq_len: int | None = None,
          prefill_chunk: int = 256, n_slots: int | None = None, max_rank: int | None = None,
          cpu_adapters: int = 512, cpu_bytes: int | None = None, max_prompt_tokens: int | None = None,
          max_tokens_limit: int = 4096, request_timeout: float = 300.0, watch: bool = False,
          drain_timeout: float = 30.0, dtype: str = "float32", device: str = "cpu", threads: int | None = None,
          merge_single_adapter: bool = False, log_level: str = "info") -> None:
    """Serve a run's base model and all its introvert experts behind one OpenAI-compatible endpoint.

    Clients use model "base", "auto" (routed by content; needs --router) or an expert id such as expert-00003.

    Args:
        run: Run directory (its run.json names the base model; experts/ holds the PEFT adapters).
        host: Interface to bind. Anything but localhost requires an API key.
        port: TCP port.
        api_key: Bearer key clients must send; defaults to $UPCYCLE_API_KEY; none means no auth (localhost only).
        router: `package.module:factory` building a SequenceRouter from the run path, enabling model "auto"
            (e.g. upcycle.introvert.routing:router_for_run).
        max_batch: Requests generating together (rows of one forward).
        max_waiting: Requests allowed to queue; beyond it the server answers 429.
        max_seq_len: Context per request (prompt + generation); default the model's, at most 2048.
        prefill_chunk: Most prompt tokens a request feeds per step.
        n_slots: Adapters active in the model at once (default 2 x max_batch).
        max_rank: Largest LoRA rank servable (default: the largest among the run's experts).
        cpu_adapters: Adapters kept loaded in CPU memory (LRU).
        cpu_bytes: Optional byte cap for those adapters.
        max_prompt_tokens: Longest prompt accepted (default: the context minus one).
        max_tokens_limit: Largest max_tokens a request may ask for.
        request_timeout: Seconds before an unfinished request is cancelled (504).
        watch: Keep the experts in sync with the run's experts/ directory while serving.
        drain_timeout: Seconds in-flight requests get to finish on shutdown (SIGTERM / Ctrl-C).
        dtype: float32, bfloat16 or float16.
        device: cpu or cuda[:N].
        threads: torch intra-op threads (1 suits small models on shared CPUs); default torch's choice.
        merge_single_adapter: Run merged weights while all running requests share one expert (base speed for a
            lone request, one extra copy of the wrapped weights).
        log_level: uvicorn and upcycle log level.
    """
    from upcycle.introvert.run import Run
    from upcycle.serving.cache import CacheConfig
    from upcycle.serving.engine import Engine, EngineConfig
    from upcycle.serving.router import load_router
    from upcycle.serving.server import ServerConfig, create_app, make_server

    logging.basicConfig(level=log_level.upper())
    api_key = api_key or os.environ.get("UPCYCLE_API_KEY") or None
    if api_key is None and not is_loopback(host):
        raise UserError(f"binding to {host} exposes the server beyond this machine: pass --api_key (or set "
                        "UPCYCLE_API_KEY), or bind to 127.0.0.1")
    opened = Run.open(run)
    engine_config = EngineConfig(max_batch=max_batch, max_waiting=max_waiting, max_seq_len=max_seq_len,
                                 prefill_chunk=prefill_chunk, n_slots=n_slots, max_rank=max_rank,
                                 request_timeout_s=request_timeout, dtype=dtype, device=device,
                                 torch_threads=threads, merge_single_adapter=merge_single_adapter,
                                 cache=CacheConfig(cpu_max_adapters=cpu_adapters, cpu_max_bytes=cpu_bytes))
    engine = Engine.from_run(opened.path, engine_config)
    server_config = ServerConfig(api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                                 max_tokens_limit=max_tokens_limit, request_timeout_s=request_timeout,
                                 watch_dir=str(opened.experts_dir) if watch else None, drain_timeout_s=drain_timeout)
    if router is None and (opened.clusters_dir / "centroids.npy").is_file():
        router = DEFAULT_ROUTER  # a run made by `upcycle cluster` routes with its own centroids
    app = create_app(engine, server_config, load_router(router, str(opened.path)) if router else None)
    log.info("serving %s with %d experts on http://%s:%d/v1", opened.path, len(opened.expert_ids()), host, port)
    try:
        make_server(app, host, port, drain_timeout, log_level).run()
    finally:
        engine.close()
