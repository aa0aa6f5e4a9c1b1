"""Bounded load test: C concurrent OpenAI clients for D seconds against the server; prints one JSON object.

Without `--url` it serves a run in this process on 127.0.0.1 (a synthetic set with `--synthetic N`: tiny random
Llama and N random LoRA experts in a temporary directory) and samples the process's resident memory every half
second, so a leak shows as `rss_mb.end` well above `rss_mb.after_warmup`. Clients mix streaming and plain calls,
completions and chat, and models (auto when listed, base, random experts), with 8-32 new tokens each.

`--hostile F` makes a fraction F of the calls hostile (`HOSTILE_KINDS`: token ids the model does not have, an
expert whose adapter is corrupt, a body over the size limit, a lone surrogate, a seed torch cannot take). They are
counted apart, by kind and status; `errors` and the latencies cover the valid calls only, which must not suffer.

    python -m upcycle.serving.loadtest --synthetic 100 --clients 32 --seconds 60 --hostile 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HOSTILE_KINDS = ("bad_token_ids", "corrupt_adapter", "oversized_body", "lone_surrogate", "huge_seed")
"""What a hostile call sends; `corrupt_adapter` needs the ids of corrupt experts (the in-process server has some)."""
EXPECTED_STATUS = {"bad_token_ids": 400, "corrupt_adapter": 500, "oversized_body": 413, "lone_surrogate": 400,
                   "huge_seed": 400}
"""The answer each hostile kind must get: a clean error, never a hang or a 500 (but for the corrupt adapter's own)."""


def _rss_mb() -> float:
    """Resident set size of this process (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _hostile_body(kind: str, rng: random.Random, corrupt: list[str], max_body_bytes: int) -> bytes:
    """The raw JSON of one hostile completion request of `kind`."""
    body: dict = {"model": "base", "prompt": "def f(x):", "max_tokens": 8}
    if kind == "bad_token_ids":
        body["prompt"] = rng.choice([[999_999], [-7], [1, 2, 2**40]])
    elif kind == "corrupt_adapter":
        body["model"], body["stream"] = rng.choice(corrupt), rng.random() < 0.5
    elif kind == "oversized_body":
        body["prompt"] = "x" * (max_body_bytes + 1)
    elif kind == "lone_surrogate":
        body["prompt"] = "def f(x):\ud800"
    elif kind == "huge_seed":
        body["seed"] = 2**70
    return json.dumps(body).encode()  # ensure_ascii escapes the surrogate as JSON allows


async def _hostile_call(http, base_url: str, api_key: str, rng: random.Random, corrupt: list[str],
                        max_body_bytes: int, outcomes: Counter) -> None:
    """One hostile call; its outcome is `kind:status` ('unexpected' marks a status other than EXPECTED_STATUS)."""
    import httpx

    kinds = [k for k in HOSTILE_KINDS if k != "corrupt_adapter" or corrupt]
    kind = rng.choice(kinds)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    try:
        response = await http.post(f"{base_url}/completions", content=_hostile_body(kind, rng, corrupt,
                                                                                      max_body_bytes), headers=headers)
        status = response.status_code
    except httpx.HTTPError as error:
        status = type(error).__name__
    outcomes[f"{kind}:{status}" + ("" if status == EXPECTED_STATUS[kind] else ":unexpected")] += 1


async def _client(client, models: list[str], deadline: float, seed: int, outcomes: Counter, latencies: list[float],
                  tokens: list[int], hostile: float = 0.0, hostile_call=None) -> None:
    import openai

    rng = random.Random(seed)
    while time.monotonic() < deadline:
        if hostile_call is not None and rng.random() < hostile:
            await hostile_call(rng)
            continue
        model, stream, chat = rng.choice(models), rng.random() < 0.5, rng.random() < 0.3
        max_tokens = rng.randint(8, 32)
        prompt = f"def function_{rng.randint(0, 999)}(x):\n    return"
        start = time.monotonic()
        try:
            if chat:
                messages = [{"role": "user", "content": prompt}]
                if stream:
                    chunks = await client.chat.completions.create(model=model, messages=messages, stream=True,
                                                                  max_tokens=max_tokens,
                                                                  stream_options={"include_usage": True})
                    async for chunk in chunks:
                        if chunk.usage:
                            tokens.append(chunk.usage.completion_tokens)
                else:
                    reply = await client.chat.completions.create(model=model, messages=messages,
                                                                 max_tokens=max_tokens)
                    tokens.append(reply.usage.completion_tokens)
            elif stream:
                chunks = await client.completions.create(model=model, prompt=prompt, stream=True,
                                                         max_tokens=max_tokens,
                                                         stream_options={"include_usage": True})
                async for chunk in chunks:
                    if chunk.usage:
                        tokens.append(chunk.usage.completion_tokens)
            else:
                reply = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
                tokens.append(reply.usage.completion_tokens)
            outcomes["ok"] += 1
            latencies.append(time.monotonic() - start)
        except openai.APIStatusError as error:
            outcomes[f"http_{error.status_code}"] += 1
        except openai.APIError as error:
            outcomes[type(error).__name__] += 1


async def run_load(base_url: str, api_key: str, clients: int, seconds: float, seed: int = 0, hostile: float = 0.0,
                   corrupt_experts: list[str] | None = None, max_body_bytes: int = 1 << 20) -> dict:
    """Drive `clients` concurrent clients for `seconds`; returns counts, tokens/s and latency percentiles.

    A fraction `hostile` of the calls are hostile (see the module docstring); `corrupt_experts` are served experts
    with a damaged adapter, which valid calls never ask for; `max_body_bytes` is the server's body limit.
    """
    import httpx
    import openai

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4), timeout=120)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, http_client=http)
    corrupt = list(corrupt_experts or [])
    listed = [m.id for m in (await client.models.list()).data]
    experts = [m for m in listed if m not in ("base", "auto", *corrupt)]
    models = (["auto"] if "auto" in listed else []) + ["base"] + experts[:200]
    outcomes: Counter = Counter()
    hostile_outcomes: Counter = Counter()
    latencies: list[float] = []
    tokens: list[int] = []

    async def hostile_call(rng: random.Random) -> None:
        await _hostile_call(http, base_url, api_key, rng, corrupt, max_body_bytes, hostile_outcomes)

    start = time.monotonic()
    await asyncio.gather(*(_client(client, models, start + seconds, seed + i, outcomes, latencies, tokens, hostile,
                                   hostile_call) for i in range(clients)))
    wall = time.monotonic() - start
    await http.aclose()
    result = {"clients": clients, "seconds": round(wall, 1), "outcomes": dict(outcomes),
              "errors": sum(n for k, n in outcomes.items() if k != "ok"), "generated_tokens": sum(tokens),
              "tokens_per_s": round(sum(tokens) / wall, 1),
              "latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 1) if latencies else None,
              "latency_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 1) if latencies else None}
    if hostile:
        unexpected = sum(n for k, n in hostile_outcomes.items() if k.endswith(":unexpected"))
        result["hostile"] = {"calls": sum(hostile_outcomes.values()), "unexpected": unexpected,
                             "outcomes": dict(sorted(hostile_outcomes.items()))}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server's base URL (…/v1); default: serve --run here")
    parser.add_argument("--api-key", default="load-test")
    parser.add_argument("--run", help="run directory to serve in-process")
    parser.add_argument("--synthetic", type=int, default=0, help="serve this many synthetic experts")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--hostile", type=float, default=0.0, help="fraction of hostile calls (e.g. 0.02)")
    parser.add_argument("--corrupt-experts", nargs="*", default=[],
                        help="with --url: experts whose adapter is corrupt (the in-process server adds its own)")
    args = parser.parse_args(argv)
    if args.url:
        result = asyncio.run(run_load(args.url, args.api_key, args.clients, args.seconds, hostile=args.hostile,
                                      corrupt_experts=args.corrupt_experts))
        print(json.dumps(result, indent=2))
        return result
    if not args.run and not args.synthetic:
        parser.error("give --url, --run or --synthetic N")
    with tempfile.TemporaryDirectory(prefix="upcycle-loadtest-") as tmp:
        result = _serve_and_load(args, Path(tmp))
    print(json.dumps(result, indent=2))
    return result


def _serve_and_load(args, tmp: Path) -> dict:
    """Serve `--run` (or synthetic experts) in this process, warm it up, load it, and report memory and engine state."""
    import torch

    from upcycle.serving.config import EngineConfig, ServerConfig
    from upcycle.serving.engine import Engine
    from upcycle.serving.server import create_app

    torch.set_num_threads(1)
    rss_start = _rss_mb()
    served, corrupt = _served_model(args, tmp)
    engine_config = EngineConfig(max_batch=args.max_batch, max_seq_len=256, max_waiting=4 * args.clients)
    engine = Engine.from_pretrained(served.base, served.experts, engine_config, served.loader)
    server_config = ServerConfig(api_key=args.api_key)
    server, thread, port = _start_server(create_app(engine, server_config))
    url = f"http://127.0.0.1:{port}/v1"
    after_load = _rss_mb()
    asyncio.run(run_load(url, args.api_key, args.clients, min(5.0, args.seconds), seed=10_000,
                         corrupt_experts=corrupt))  # warm-up, valid calls only
    after_warmup = _rss_mb()
    with _sampling_rss() as samples:
        result = asyncio.run(run_load(url, args.api_key, args.clients, args.seconds, hostile=args.hostile,
                                      corrupt_experts=corrupt, max_body_bytes=server_config.max_body_bytes))
    result["rss_mb"] = {"process_start": round(rss_start, 1), "after_model_load": round(after_load, 1),
                        "after_warmup": round(after_warmup, 1), "end": round(_rss_mb(), 1),
                        "peak": round(max(samples, default=after_warmup), 1)}
    result["engine_alive"] = engine.is_running and not engine.is_dead
    result["cache"] = engine.cache.snapshot() if engine.cache is not None else {}
    result["engine_outcomes"] = engine.stats.requests.snapshot()
    server.begin_shutdown()
    thread.join(timeout=60)
    engine.close()
    return result


def _served_model(args, tmp: Path):
    """(ServedModel, corrupt expert names): the run in `--run`, or a tiny base with `--synthetic` experts in `tmp`.

    Only the synthetic set gets corrupt experts for hostile traffic: a real run's directory is not written to.
    """
    from upcycle.serving.source import ServedModel, open_source
    from upcycle.serving.synthetic import save_tiny_base, write_synthetic_experts

    if args.run:
        served = open_source(args.run, router=False)
    else:
        base = save_tiny_base(tmp / "base")
        experts_dir = tmp / "experts"
        served = ServedModel(str(base), write_synthetic_experts(experts_dir, base, args.synthetic, rank=8),
                             experts_dir=experts_dir)
    corrupt = _add_corrupt_experts(served) if args.hostile and not args.run else []
    return served, corrupt


def _start_server(app) -> tuple:
    """(server, its thread, port): `app` served on a free local port from a daemon thread, once it has started."""
    import socket

    from upcycle.serving.server import make_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, port


@contextmanager
def _sampling_rss(every_s: float = 0.5):
    """Yields a list that a background thread fills with this process's RSS (MB) every `every_s` seconds, so the
    report can give the peak under load, not just the value at the end."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            samples.append(_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()


def _add_corrupt_experts(served) -> list[str]:
    """One expert per kind of corrupt adapter, numbered from 90000 so valid traffic can tell them apart."""
    from upcycle.serving.synthetic import CORRUPTIONS, synthetic_name, write_corrupt_adapter

    good = served.experts[min(served.experts)]
    names = [synthetic_name(90_000 + i) for i in range(len(CORRUPTIONS))]
    for name, kind in zip(names, CORRUPTIONS, strict=True):
        served.experts[name] = write_corrupt_adapter(good, served.experts_dir / name, kind)
    return names


if __name__ == "__main__":
    main()
