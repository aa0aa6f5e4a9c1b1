"""`upcycle serve`: the CLI's view of the serving package (a plain function; its signature is the command line)."""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import re
import socket
from typing import Any

from upcycle.errors import UserError

log = logging.getLogger(__name__)
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")
"""What `pip install 'upcycle[serve]'` brings that the server imports."""

# Flag -> smallest value it takes (None means "not set", always allowed); compared as `not value >= low` so NaN fails.
_MINIMUMS: dict[str, float] = {
    "port": 1, "max_batch": 1, "max_waiting": 0, "prefill_chunk": 1, "n_slots": 1, "max_rank": 1, "cpu_adapters": 1,
    "cpu_bytes": 1, "max_seq_len": 2, "max_prompt_tokens": 1, "max_tokens_limit": 1, "drain_timeout": 0,
    "threads": 1, "max_body_bytes": 1,
}
_DTYPES = ("float32", "bfloat16", "float16")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


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


def require_serve_extra() -> None:
    """UserError naming the extra to install when the server's dependencies are missing."""
    missing = []
    for module in SERVE_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"upcycle serve needs the serve extra ({', '.join(missing)} not installed): "
                        "pip install 'upcycle[serve]'")


def check_serve_flags(flags: dict[str, Any]) -> None:
    """UserError naming the first bad `upcycle serve` flag, before any model is loaded."""
    for name, low in _MINIMUMS.items():
        value = flags[name]
        if value is not None and not value >= low:
            raise UserError(f"--{name} must be at least {low:g}, got {value}")
    if not flags["port"] <= 65535:
        raise UserError(f"--port must be a TCP port (1-65535), got {flags['port']}")
    if not flags["request_timeout"] > 0:
        raise UserError(f"--request_timeout must be positive seconds, got {flags['request_timeout']}")
    if flags["n_slots"] is not None and flags["n_slots"] < flags["max_batch"]:
        raise UserError(f"--n_slots ({flags['n_slots']}) must be at least --max_batch ({flags['max_batch']}): every "
                        "running request holds an adapter slot")
    if flags["dtype"] not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {flags['dtype']!r}")
    if flags["log_level"].lower() not in _LOG_LEVELS:
        raise UserError(f"--log_level must be one of {', '.join(_LOG_LEVELS)}, got {flags['log_level']!r}")
    device = flags["device"]
    if not _DEVICE.match(device):
        raise UserError(f"--device must be cpu, mps, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine's PyTorch sees no CUDA device; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if flags["admin_key"] is not None and flags["admin_key"] == flags["api_key"]:
        raise UserError("--admin_key must differ from --api_key: inference clients must not manage experts")


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          admin_key: str | None = None, adapter_root: list[str] | None = None, max_body_bytes: int = 1 << 20,
          docs: bool = False, router: str | None = None, max_batch: int = 16, max_waiting: int = 256,
          max_seq_len: int | None = None, prefill_chunk: int = 256, n_slots: int | None = None,
          max_rank: int | None = None, cpu_adapters: int = 512, cpu_bytes: int | None = None,
          max_prompt_tokens: int | None = None, max_tokens_limit: int = 4096, request_timeout: float = 300.0,
          watch: bool = False, drain_timeout: float = 30.0, dtype: str = "float32", device: str = "cpu",
          threads: int | None = None, merge_single_adapter: bool = False, log_level: str = "info") -> None:
    """Serve a run's base model and all its introvert experts behind one OpenAI-compatible endpoint.

    Clients use model "base", "auto" (routed by content; needs --router) or an expert id such as expert-00003.

    Args:
        run: Run directory (its run.json names the base model; experts/ holds the PEFT adapters).
        host: Interface to bind. Anything but localhost requires an API key.
        port: TCP port.
        api_key: Bearer key clients must send; defaults to $UPCYCLE_API_KEY; none means no auth (localhost only).
        admin_key: Bearer key of /admin/experts (add / remove experts); defaults to $UPCYCLE_ADMIN_KEY. Without
            it /admin is off, except on localhost, where it takes the API key.
        adapter_root: Directories /admin/experts may add adapters from (default: the run directory).
        max_body_bytes: Largest request body accepted; bigger ones get 413.
        docs: Serve the OpenAPI docs (/docs, /redoc, /openapi.json).
        router: `package.module:factory` building an ExpertRouter from the run path, enabling model "auto"
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
    require_serve_extra()
    api_key = api_key or os.environ.get("UPCYCLE_API_KEY") or None
    admin_key = admin_key or os.environ.get("UPCYCLE_ADMIN_KEY") or None
    check_serve_flags(locals())  # every argument, by its flag name

    from upcycle.serving.cache import CacheConfig
    from upcycle.serving.engine import Engine, EngineConfig
    from upcycle.serving.router import load_router
    from upcycle.serving.server import ServerConfig, admin_check, create_app, make_server
    from upcycle.serving.source import open_source

    logging.basicConfig(level=log_level.upper())
    local = is_loopback(host)
    if api_key is None and not local:
        raise UserError(f"binding to {host} exposes the server beyond this machine: pass --api_key (or set "
                        "UPCYCLE_API_KEY), or bind to 127.0.0.1")
    served = open_source(run, router=router is None)  # a run made by `upcycle cluster` routes with its centroids
    engine_config = EngineConfig(max_batch=max_batch, max_waiting=max_waiting, max_seq_len=max_seq_len,
                                 prefill_chunk=prefill_chunk, n_slots=n_slots, max_rank=max_rank,
                                 request_timeout_s=request_timeout, dtype=dtype, device=device,
                                 torch_threads=threads, merge_single_adapter=merge_single_adapter,
                                 cache=CacheConfig(cpu_max_adapters=cpu_adapters, cpu_max_bytes=cpu_bytes))
    engine = Engine.from_pretrained(served.base, served.experts, engine_config)
    server_config = ServerConfig(api_key=api_key, admin_key=admin_key, local_only=local,
                                 adapter_roots=tuple(adapter_root or [str(served.root or run)]),
                                 max_body_bytes=max_body_bytes, docs=docs, max_prompt_tokens=max_prompt_tokens,
                                 max_tokens_limit=max_tokens_limit, request_timeout_s=request_timeout,
                                 watch_dir=str(served.experts_dir) if watch and served.experts_dir else None,
                                 drain_timeout_s=drain_timeout)
    if admin_check(server_config) is None:
        log.warning("/admin is off: serving beyond localhost, it needs its own key (--admin_key)")
    app = create_app(engine, server_config, load_router(router, str(served.root or run)) if router else served.router)
    log.info("serving %s with %d experts on http://%s:%d/v1", served.root or run, len(served.experts), host, port)
    try:
        make_server(app, host, port, drain_timeout, log_level).run()
    finally:
        engine.close()
