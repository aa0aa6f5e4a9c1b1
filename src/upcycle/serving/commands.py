"""`upcycle serve`: the CLI's view of the serving package (a plain function; its signature is the command line)."""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import re
import socket
from dataclasses import replace

from upcycle.errors import UserError
from upcycle.serving.config import EngineConfig, RoutingConfig, ServerConfig

log = logging.getLogger(__name__)
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")
"""What `pip install 'upcycle[serve]'` brings that the server imports."""

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


def check_serve_flags(port: int, log_level: str, engine: EngineConfig, server: ServerConfig) -> None:
    """UserError naming the first bad `upcycle serve` flag that its config dataclass cannot judge alone, before any
    model is loaded (the dataclasses refuse their own bad values while the command line is parsed)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be a TCP port (1-65535), got {port}")
    if log_level.lower() not in _LOG_LEVELS:
        raise UserError(f"--log_level must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")
    device = engine.device
    if not _DEVICE.match(device):
        raise UserError(f"--engine.device must be cpu, mps, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--engine.device {device}: this machine's PyTorch sees no CUDA device; use "
                            "--engine.device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--engine.device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if server.admin_key is not None and server.admin_key == server.api_key:
        raise UserError("--server.admin_key must differ from --server.api_key: inference clients must not manage "
                        "experts")


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, router: str | None = None, watch: bool = False,
          log_level: str = "info", engine: EngineConfig = EngineConfig(), server: ServerConfig = ServerConfig(),
          routing: RoutingConfig = RoutingConfig(), source: str = "introvert") -> None:
    """Serve a run's base model and all its introvert experts behind one OpenAI-compatible endpoint.

    Clients use model "base", "auto" (routed by content; needs --router) or an expert id such as expert-00003.
    With "auto" a request may send `top_k` to mix the k nearest experts; the answer's x-upcycle-expert header lists
    the experts used ("base" when the out-of-domain guard sent it there).

    Args:
        run: Run directory (its run.json names the base model; experts/ holds the PEFT adapters).
        host: Interface to bind. Anything but localhost requires an API key (--server.api_key).
        port: TCP port.
        router: `package.module:factory` building an ExpertRouter from the run path, enabling model "auto"
            (default for a run made by `upcycle introvert cluster`: its own centroids).
        watch: Keep the experts in sync with the run's experts/ directory while serving.
        log_level: uvicorn and upcycle log level.
        engine: The batching engine: batch, queue, context, adapter slots and cache, dtype, device, threads.
        server: The HTTP side. api_key and admin_key default to $UPCYCLE_API_KEY and $UPCYCLE_ADMIN_KEY;
            adapter_roots to the run directory; local_only is set from --host.
        routing: How model "auto" decides with the run's own router: the default top_k, the mixture temperature,
            and the out-of-domain guard (calibrated on the run's validation documents) with where it sends a
            request beyond it. Ignored with --router.
        source: What `run` is: 'introvert' (a run of `upcycle introvert`), 'masks' (a model written by `upcycle
            masks export`, served as model "base") or a `package.module:factory` returning a ServedModel.
    """
    require_serve_extra()
    server = replace(server, api_key=server.api_key or os.environ.get("UPCYCLE_API_KEY") or None,
                     admin_key=server.admin_key or os.environ.get("UPCYCLE_ADMIN_KEY") or None)
    check_serve_flags(port, log_level, engine, server)

    from upcycle.serving.engine import Engine
    from upcycle.serving.router import load_router
    from upcycle.serving.server import admin_check, create_app, make_server
    from upcycle.serving.source import open_source

    logging.basicConfig(level=log_level.upper())
    local = is_loopback(host)
    if server.api_key is None and not local:
        raise UserError(f"binding to {host} exposes the server beyond this machine: pass --server.api_key (or set "
                        "UPCYCLE_API_KEY), or bind to 127.0.0.1")
    served = open_source(run, router=router is None, spec=source, routing=routing)
    batching = Engine.from_pretrained(served.base, served.experts, engine, served.loader)
    root = str(served.root or run)
    server = replace(server, local_only=local, adapter_roots=tuple(server.adapter_roots or [root]),
                     watch_dir=str(served.experts_dir) if watch and served.experts_dir else server.watch_dir)
    if admin_check(server) is None:
        log.warning("/admin is off: serving beyond localhost, it needs its own key (--server.admin_key)")
    app = create_app(batching, server, load_router(router, root) if router else served.router)
    log.info("serving %s with %d experts on http://%s:%d/v1", root, len(served.experts), host, port)
    try:
        make_server(app, host, port, server.drain_timeout_s, log_level).run()
    finally:
        batching.close()
