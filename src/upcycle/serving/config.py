"""Typed settings of the server: the adapter cache, the batching engine and the HTTP side (importable without torch).

`upcycle serve` takes them as the groups --engine.* (with --engine.cache.*), --server.* and --routing.* (also what
`upcycle introvert evaluate` routes with); a bad value is refused with the flag's name when the command line is
parsed, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def _at_least(flag: str, value: float | None, low: float) -> None:
    """UserError unless `value` is None or >= `low` (written `not value >= low`, so NaN is refused too)."""
    if value is not None and not value >= low:
        raise UserError(f"{flag} must be at least {low:g}, got {value}")


def _positive_seconds(flag: str, value: float | None) -> None:
    """UserError unless `value` is None or a positive number of seconds (NaN refused)."""
    if value is not None and not value > 0:
        raise UserError(f"{flag} must be positive seconds, got {value}")


@dataclass
class CacheConfig:
    """Capacities of the CPU tier and how disk loads run (the active tier's size is the model's slot count)."""

    cpu_max_adapters: int = 512
    """Most adapters kept loaded in CPU memory."""
    cpu_max_bytes: int | None = None
    """Optional cap on the bytes of those adapters (whichever limit binds first evicts)."""
    prefetch_workers: int = 1
    """Threads loading queued requests' adapters from disk ahead of their turn."""
    pin_memory: bool = False
    """Keep CPU copies in page-locked memory (worth it only with a CUDA model: asynchronous host-to-device copies)."""

    def __post_init__(self) -> None:
        _at_least("--engine.cache.cpu_max_adapters", self.cpu_max_adapters, 1)
        _at_least("--engine.cache.cpu_max_bytes", self.cpu_max_bytes, 1)
        _at_least("--engine.cache.prefetch_workers", self.prefetch_workers, 1)


@dataclass
class EngineConfig:
    """Capacities and limits of the batching engine."""

    max_batch: int = 16
    """Rows (requests) generating together; also the KV cache's row count."""
    max_waiting: int = 256
    """Requests allowed to wait for a row; beyond it `submit` raises QueueFull (HTTP 429)."""
    max_seq_len: int | None = None
    """Prompt plus generated tokens per request; None: the model's max positions, at most 2048."""
    prefill_chunk: int = 256
    """Most prompt tokens a row feeds per step, so a long prompt cannot stall everyone's decoding."""
    mixed_step_max_padding: int = 32
    """Most padding positions a step may add to its decoding rows by batching them with prefilling rows; above it,
    prefilling and decoding rows run as separate forwards (`engine.forward_groups`). 32 is a few batch-1 forwards'
    worth of token compute on a CPU: on SmolLM2-135M a batch-1 decode step costs what ~6 prefill tokens cost."""
    n_slots: int | None = None
    """Active adapter slots in the model; None: 2 x max_batch. Must be >= max_batch so a free row always finds one."""
    max_rank: int | None = None
    """Largest adapter rank servable; None: the largest among the experts at startup (at least 8)."""
    target_modules: list[str] | None = None
    """Layers to wrap (PEFT rule); None: those targeted by any expert at startup, else every linear in the blocks."""
    merge_single_adapter: bool = False
    """When all running rows use one adapter, run merged weights (base-model speed for a lone request); costs one
    extra copy of every wrapped weight."""
    request_timeout_s: float | None = 300.0
    """A request still unfinished after this many seconds fails with a timeout; None: no limit."""
    default_max_tokens: int = 256
    """max_tokens for requests that give none (clipped to the context left)."""
    dtype: str = "float32"
    """Model and adapter dtype (float32, bfloat16, float16)."""
    device: str = "cpu"
    """Torch device of the model and the active slots."""
    torch_threads: int | None = None
    """If set, `torch.set_num_threads` for the process (1 is best for small models on shared CPU cores)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """CPU/disk tiers of the adapter cache."""

    def __post_init__(self) -> None:
        for name, low in (("max_batch", 1), ("max_waiting", 0), ("max_seq_len", 2), ("prefill_chunk", 1),
                          ("mixed_step_max_padding", 0), ("n_slots", 1), ("max_rank", 1), ("default_max_tokens", 1),
                          ("torch_threads", 1)):
            _at_least(f"--engine.{name}", getattr(self, name), low)
        _positive_seconds("--engine.request_timeout_s", self.request_timeout_s)
        if self.n_slots is not None and self.n_slots < self.max_batch:
            raise UserError(f"--engine.n_slots ({self.n_slots}) must be at least --engine.max_batch "
                            f"({self.max_batch}): every running request holds an adapter slot")
        if self.dtype not in DTYPES:
            raise UserError(f"--engine.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class ServerConfig:
    """HTTP-side limits and switches (the engine has its own: batch, queue, context)."""

    api_key: str | None = None
    """Bearer key required on /v1 and /metrics; None disables auth (allowed only on localhost)."""
    admin_key: str | None = None
    """Bearer key of /admin (a separate key: an inference client must not manage experts). Without it /admin is
    served only when `local_only`, under `api_key`."""
    local_only: bool = True
    """The server listens on a loopback interface only (`upcycle serve` sets it from --host)."""
    adapter_roots: tuple[str, ...] = ()
    """Directories /admin/experts may add adapters from (symlinks leading out are refused); empty: none."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; a bigger one gets 413 before any of it is parsed."""
    docs: bool = False
    """Serve /docs, /redoc and /openapi.json (they list every route, admin included)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (tokens); None: the engine's context minus one."""
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for."""
    request_timeout_s: float = 300.0
    """A request unfinished after this long is cancelled and answered 504."""
    enable_admin: bool = True
    """Serve /admin/experts (add / remove experts at runtime), subject to `admin_key` / `local_only`."""
    watch_dir: str | None = None
    """Directory of expert dirs to keep in sync with (new ones registered, removed ones unregistered)."""
    watch_interval_s: float = 2.0
    """How often `watch_dir` is scanned."""
    drain_timeout_s: float = 30.0
    """On shutdown, how long running requests may take to finish."""

    def __post_init__(self) -> None:
        for name, low in (("max_body_bytes", 1), ("max_prompt_tokens", 1), ("max_tokens_limit", 1),
                          ("drain_timeout_s", 0)):
            _at_least(f"--server.{name}", getattr(self, name), low)
        for name in ("request_timeout_s", "watch_interval_s"):
            _positive_seconds(f"--server.{name}", getattr(self, name))
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise UserError("--server.admin_key must differ from --server.api_key: inference clients must not manage "
                            "experts")


OUT_OF_DOMAIN = ("base", "mixture")


@dataclass
class RoutingConfig:
    """How model "auto" routes a whole request: MoIN's nearest expert, c-BTM's top-k mixture, and the out-of-domain
    guard (the method's router applies them: for introvert runs `upcycle.introvert.router.EmbeddingRouter.decide`).

    Distances are squared: for the cosine metric they lie in [0, 4]. A request's `top_k` field overrides `top_k`.
    """

    top_k: int = 1
    """Experts mixed per request (1: MoIN's single nearest expert; k > 1: c-BTM's mixture of the k nearest)."""
    temperature: float = 0.1
    """Mixture weights are softmax(-d² / temperature) over the k nearest centroids."""
    guard_percentile: float | None = 99.0
    """The guard's threshold is this percentile of the validation documents' distances to their nearest centroid
    (calibrated on validation, never on test). None turns the guard off."""
    guard_threshold: float | None = None
    """A fixed threshold on the squared distance instead of the calibrated one (cosine: within [0, 4])."""
    guard_prompt_chars: int | None = 1000
    """The calibration embeds the first this-many characters of each validation document, because requests are
    prompts and a prefix can lie farther from its centroid than its whole document (on the tiny tf-idf run of
    docs/moin.md, a 99th-percentile guard calibrated on whole documents flagged 7 % of validation prompts). Set it
    near your prompts' length; None: the whole documents' embeddings saved by the cluster step."""
    out_of_domain: str = "base"
    """Where a request beyond the threshold goes: 'base' (the model without adapters) or 'mixture' (top-k mixture,
    with k = max(top_k, 2))."""

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UserError(f"--routing.top_k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise UserError(f"--routing.temperature must be > 0, got {self.temperature}")
        if self.guard_percentile is not None and not 0 < self.guard_percentile <= 100:
            raise UserError(f"--routing.guard_percentile must be in (0, 100], got {self.guard_percentile}")
        if self.guard_threshold is not None and not self.guard_threshold >= 0:
            raise UserError(f"--routing.guard_threshold must be >= 0, got {self.guard_threshold}")
        if self.guard_prompt_chars is not None and self.guard_prompt_chars < 1:
            raise UserError(f"--routing.guard_prompt_chars must be >= 1 or null, got {self.guard_prompt_chars}")
        if self.out_of_domain not in OUT_OF_DOMAIN:
            raise UserError(f"--routing.out_of_domain {self.out_of_domain}: choose one of {', '.join(OUT_OF_DOMAIN)}")
