"""Continuous batching across requests for different experts: one forward per step serves every running row.

Each step the scheduler (1) takes newly submitted requests, (2) drops cancelled, timed-out and removed-expert ones,
(3) admits waiting requests into free rows (acquiring their adapter's slot; a request whose adapter is still coming
from disk waits while others run, its prefetch started at submit), (4) runs one forward in which new rows prefill a
chunk of their prompt and the others decode one token, each row through its own adapter (`MultiLoRA.select`), and
(5) samples, streams text, and retires finished rows. Keys and values live in a fixed `SlotKVCache`.

A request may mix k experts (c-BTM top-k): it then runs as a group of k rows of the same forward, one per expert's
adapter, over the same tokens. Each step the group samples one token from the weighted mixture of its rows'
next-token distributions (`sampling.mixture_scores`) and feeds that token to all k rows. The group is one `Request`:
it is admitted only when k rows and all k adapters are available (never half), and cancellation, timeout, expert
removal and errors retire all of its rows together. A request's rows are contiguous in the KV cache.

Requests talk back through a `sink` callable, called on the engine thread with `Delta`, `Finished` or `Failed`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from upcycle.models.surgery import matches_target
from upcycle.ops.batched_lora import MultiLoRA, attach_multi_lora
from upcycle.serving.adapters import AdapterWeights, read_spec
from upcycle.serving.cache import AdapterCache
from upcycle.serving.config import CacheConfig, EngineConfig
from upcycle.serving.errors import (
    AdapterError,
    Cancelled,
    ExpertRemoved,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    QueueFull,
    RequestTimeout,
    ServingError,
    UnknownModel,
)
from upcycle.serving.kv_cache import SlotKVCache
from upcycle.serving.sampling import SamplingParams, TextStream, mixture_scores, sample_tokens
from upcycle.serving.stats import Counters, LatencyStats

log = logging.getLogger(__name__)


# -- events sent to a request's sink --------------------------------------------------------------------------------
@dataclass
class Delta:
    """New text (possibly empty when only held back) and the token ids that produced it."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    """The request is done; `reason` is 'stop' (eos or stop string) or 'length'."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    """The request ended with an error; nothing more follows."""

    error: ServingError


Event = Delta | Finished | Failed
Sink = Callable[[Event], None]


@dataclass
class Completion:
    """What `Engine.generate` returns."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    expert: str | None
    """The expert, the comma-separated experts of a mixture, or None (the base model)."""


class Request:
    """One submitted generation. `cancel` may be called from any thread; the engine drops the request next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], experts: tuple[str, ...], weights: tuple[float, ...],
                 params: SamplingParams, sink: Sink, stream: TextStream, deadline: float | None,
                 wake: Callable[[], None]) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.order = next(self._ids)
        self.prompt_ids, self.params, self.sink = prompt_ids, params, sink
        self.experts, self.weights = experts, weights  # () : the base model; k > 1: a mixture of k rows
        self.stream, self.deadline, self._wake = stream, deadline, wake
        self.created = time.monotonic()
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.cancelled = False
        self.slots = [-1] * self.width  # adapter slot of each row while running (-1: base model)
        self.prefilled = 0  # prompt tokens already in the KV cache
        self.generated: list[int] = []
        self.first_token_at: float | None = None

    @property
    def width(self) -> int:
        """Batch rows this request occupies: one per expert mixed (one for the base model)."""
        return max(1, len(self.experts))

    @property
    def expert(self) -> str | None:
        """The expert, the comma-separated experts of a mixture, or None (the base model)."""
        return ",".join(self.experts) or None

    def cancel(self) -> None:
        """Stop generating (the client went away); frees the row at the next step."""
        self.cancelled = True
        self._wake()

    def forwards_left(self, chunk: int) -> int:
        """Forwards this request still needs if it runs to max_tokens, the coming one included: the prompt chunks
        left (the last of which samples the first token), then one per further token."""
        prompt_left = len(self.prompt_ids) - self.prefilled
        if prompt_left > 0:
            return -(-prompt_left // chunk) + self.params.max_tokens - 1
        return self.params.max_tokens - len(self.generated)

    def next_input(self, chunk: int) -> list[int]:
        """Tokens this request feeds in the next forward: a prompt chunk while prefilling, else its last token."""
        if self.prefilled < len(self.prompt_ids):
            return self.prompt_ids[self.prefilled: self.prefilled + chunk]
        return self.generated[-1:]


@dataclass
class EngineStats:
    """Counters and latencies, read by /metrics and the benchmark."""

    requests: Counters = field(default_factory=Counters)
    """Finished requests by outcome: stop, length, error, cancelled, timeout."""
    tokens: Counters = field(default_factory=Counters)
    """'prompt' and 'generated' token totals."""
    latency: dict[str, LatencyStats] = field(
        default_factory=lambda: {name: LatencyStats() for name in ("request", "ttft", "step")})
    """Seconds: whole request, time to first token, one scheduler step."""
    _recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=50_000), repr=False)

    def record_tokens(self, n: int) -> None:
        """`n` tokens were generated by the step that just ended."""
        self.tokens.add("generated", n)
        self._recent.append((time.monotonic(), n))

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        cutoff = time.monotonic() - window_s
        return sum(n for t, n in list(self._recent) if t >= cutoff) / window_s


class Engine:
    """Continuous-batching generator over a base model with many LoRA experts; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None,
                 lora: MultiLoRA | None = None, cache: AdapterCache | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        self.lora, self.cache = lora, cache
        self.decoder = model.base_model  # the transformer without its head: we apply the head to one row each
        self.lm_head = model.get_output_embeddings()
        positions = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_seq_len = self.config.max_seq_len or min(positions, 2048)
        weight = next(model.parameters())
        self.kv = SlotKVCache.for_model(model.config, self.config.max_batch, self.max_seq_len, weight.dtype,
                                        weight.device)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters \
            else "past_key_values"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.stats = EngineStats()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._lock = threading.Lock()
        self._inbox: deque[Request] = deque()
        self._removed: deque[str] = deque()
        self._queued = 0  # submitted and not yet running or finished (inbox + waiting)
        self._wake_event = threading.Event()
        self._accepting = True
        self._stop = False
        self._stop_lock = threading.Lock()  # the shutdown drain and the app's lifespan may both call stop()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        """Why the scheduler thread died (None while it is healthy); /health reports it."""
        self.vocab_size = model.get_input_embeddings().num_embeddings
        if cache is not None:
            cache.add_removal_hook(self._on_removed)

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, base: str | Path, experts: dict[str, Path], config: EngineConfig | None = None,
                        loader: str | None = None) -> Engine:
        """Load `base` (a Hugging Face directory or hub id) in the config's dtype and device, then `from_model`.
        `loader` (`module:function(path, dtype=...)`, see `ServedModel.loader`) replaces AutoModelForCausalLM."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from upcycle.serving.router import load_factory

        config = config or EngineConfig()
        tokenizer = AutoTokenizer.from_pretrained(base)
        load = load_factory(loader, "loader") if loader else AutoModelForCausalLM.from_pretrained
        model = load(base, dtype=getattr(torch, config.dtype))
        return cls.from_model(model.to(config.device).eval(), tokenizer, experts, config)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, experts: dict[str, Path],
                   config: EngineConfig | None = None) -> Engine:
        """Wrap `model` for multi-LoRA serving sized for `experts` ({id: PEFT dir}) and register them."""
        config = config or EngineConfig()
        linears = [name for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()]
        specs = {}
        for expert, path in experts.items():
            try:
                specs[expert] = read_spec(path)
            except AdapterError as error:  # still registered: its own requests will get the error
                log.warning("expert %s: %s", expert, error)
        if config.target_modules is not None:
            wrapped = [n for n in linears if matches_target(n, config.target_modules)]
        elif specs:
            target_sets = {s.target_modules for s in specs.values()}
            wrapped = [n for n in linears if any(matches_target(n, t) for t in target_sets)]
        else:
            wrapped = [n for n in linears if ".layers." in n or ".h." in n]
        max_rank = config.max_rank or max([8, *(s.rank for s in specs.values())])
        n_slots = config.n_slots or 2 * config.max_batch
        lora = attach_multi_lora(model, wrapped, n_slots=n_slots, max_rank=max_rank, max_rows=config.max_batch,
                                 merge_single_slot=config.merge_single_adapter)
        pin = config.cache.pin_memory or str(config.device).startswith("cuda")
        cache_config = CacheConfig(**{**config.cache.__dict__, "pin_memory": pin})
        cache = AdapterCache(lora, cache_config, check=_compatibility_check(lora))
        for expert, path in experts.items():
            cache.register(expert, path)
        log.info("serving %d experts: %d wrapped layers, %d slots of rank %d", len(experts), len(wrapped), n_slots,
                 max_rank)
        return cls(model, tokenizer, config, lora, cache)

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return ids

    # -- submitting ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (with the tokenizer's special tokens, e.g. BOS)."""
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def submit(self, prompt_ids: list[int], expert: str | Sequence[str] | None = None,
               params: SamplingParams | None = None, sink: Sink | None = None,
               weights: Sequence[float] | None = None) -> Request:
        """Queue a generation for `expert` (None: the base model; a sequence of k names: their mixture with
        `weights`, uniform when None). Raises a ServingError if it cannot be taken."""
        if not self._accepting:
            raise self._not_accepting()
        experts, weights = self._members(expert, weights)
        for name in experts:
            if self.cache is None or not self.cache.is_registered(name):
                raise UnknownModel(f"the model '{name}' does not exist", param="model")
        if not prompt_ids:
            if self.tokenizer.bos_token_id is None:
                raise InvalidRequest("the prompt is empty", param="prompt")
            prompt_ids = [self.tokenizer.bos_token_id]
        self.check_token_ids(prompt_ids)
        params = params or SamplingParams(max_tokens=self.config.default_max_tokens)
        room = self.max_seq_len - len(prompt_ids)
        if room < 1 or params.max_tokens > room:
            raise PromptTooLong(
                f"this server's maximum context length is {self.max_seq_len} tokens; the request has "
                f"{len(prompt_ids)} prompt tokens and asks for {params.max_tokens} more", param="max_tokens")
        deadline = None if self.config.request_timeout_s is None else time.monotonic() + self.config.request_timeout_s
        request = Request(list(prompt_ids), experts, weights, params, sink or (lambda event: None),
                          TextStream(self.tokenizer, params.stop), deadline, self._wake)
        with self._lock:
            if not self._accepting:  # checked again under the lock: stop() and _die() empty the inbox under it
                raise self._not_accepting()
            if self._queued >= self.config.max_waiting:
                raise QueueFull(f"{self._queued} requests are already waiting; retry later")
            self._queued += 1
            self._inbox.append(request)
        for name in experts:
            self.cache.prefetch(name)  # disk -> CPU while it queues
        self._wake()
        return request

    def _members(self, expert: str | Sequence[str] | None, weights: Sequence[float] | None
                 ) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """(experts, weights summing to 1) of a submitted request; InvalidRequest for a mixture it cannot run."""
        experts = () if expert is None else (expert,) if isinstance(expert, str) else tuple(expert)
        if weights is None:
            weights = [1.0] * len(experts)
        if len(weights) != len(experts):
            raise InvalidRequest(f"{len(experts)} experts but {len(weights)} mixture weights", param="top_k")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or (experts and not sum(weights) > 0):
            raise InvalidRequest("mixture weights must be finite, non-negative and not all zero", param="top_k")
        if len(experts) > self.config.max_batch:
            raise InvalidRequest(f"a mixture of {len(experts)} experts runs as {len(experts)} batch rows, and this "
                                 f"server has {self.config.max_batch} (--engine.max_batch)", param="top_k")
        total = sum(weights)
        return experts, tuple(w / total for w in weights)

    def check_token_ids(self, prompt_ids: list[int]) -> None:
        """400 for ids the embedding cannot look up: caught here, they would fail the forward of a whole batch."""
        low, high = min(prompt_ids), max(prompt_ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise InvalidRequest(f"token id {bad} is out of range: this model's ids are 0..{self.vocab_size - 1}",
                                 param="prompt")

    def _not_accepting(self) -> Overloaded:
        if self.failure is not None:
            return Overloaded(f"the engine stopped after an internal error ({self.failure}); restart the server")
        return Overloaded("the server is shutting down")

    def room_for(self, prompt_tokens: int) -> int:
        """Tokens a request with this prompt may still generate."""
        return self.max_seq_len - prompt_tokens

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._queued

    # -- the scheduler step -----------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Run one scheduler step; False when there was nothing to run."""
        self._take_inbox()
        self._drop_dead()
        self._admit()
        if not self.running:
            return False
        start = time.perf_counter()
        self._forward_and_sample()
        self.stats.latency["step"].observe(time.perf_counter() - start)
        return True

    def _forward_and_sample(self) -> None:
        """One forward over every running row, then sampling; a request whose part fails is retired with the error.

        (`rows` here are running requests: a mixture's request spans several batch rows, see `_forward`.)
        """
        rows = self.running
        inputs = [r.next_input(self.config.prefill_chunk) for r in rows]
        logits, failed = {}, {}
        for group in forward_groups([len(i) for i in inputs], [r.width for r in rows],
                                    self.config.mixed_step_max_padding):
            done, lost = _per_row(group, lambda idx: self._forward(inputs, idx))
            logits |= done
            failed |= lost
        for row, request in enumerate(rows):
            if row in logits and request.prefilled < len(request.prompt_ids):
                request.prefilled += len(inputs[row])
        ready = [row for row in logits if rows[row].prefilled >= len(rows[row].prompt_ids)]  # rows that sample now
        tokens, failed_sampling = _per_row(ready, lambda idx: sample_tokens(
            _stack([_next_token_scores(rows[row], logits[row]) for row in idx]), [rows[row].params for row in idx],
            [rows[row].generator for row in idx]))
        failed |= failed_sampling
        self.stats.record_tokens(len(tokens))
        ends: dict[int, str | ServingError] = {row: _internal_error(error) for row, error in failed.items()}
        for row, token in tokens.items():
            try:
                reason = self._accept_token(rows[row], token)
            except Exception as error:  # e.g. the tokenizer choking on this row's text
                log.exception("request %s: accepting a token failed", rows[row].id)
                ends[row] = _internal_error(error)
                continue
            if reason is not None:
                ends[row] = reason
        for row in sorted(ends, reverse=True):  # from the back, so row moves stay valid
            end = ends[row]
            if isinstance(end, ServingError):
                self._retire(row, failure=end)
            else:
                self._retire(row, reason=end)

    def _forward(self, inputs: list[list[int]], requests: list[int]) -> list[torch.Tensor]:
        """Logits [k, V] of the last new position of each of `requests` (indices into `running`: all of them, or a
        single one alone), one row per expert it mixes (k = 1 for a single expert or the base)."""
        # Legend: n batch rows (sum of the requests' k), T tokens this step (longest prefill chunk, 1 when all
        # decode), V vocab, D hidden. A request's k rows feed the same tokens, each through its own adapter.
        members = [(i, slot) for i in requests for slot in self.running[i].slots]
        counts = [len(inputs[i]) for i, _ in members]
        ids = torch.full((len(members), max(counts)), self.pad_id, dtype=torch.long)  # [n, T], right-padded
        for row, (i, _) in enumerate(members):
            ids[row, : counts[row]] = torch.tensor(inputs[i])
        device = self.kv.keys[0].device
        first = self._first_row(requests[0])  # rows are contiguous: all requests, or one request's group
        position_ids, mask = self.kv.plan(counts, first=first)
        # How long this selection will last, for the merged-weight decision; only a lone request can tell (a batch
        # changes whenever another request arrives or finishes).
        ahead = self.running[requests[0]].forwards_left(self.config.prefill_chunk) - 1 if len(members) == 1 else None
        with torch.inference_mode(), self._select([slot for _, slot in members], ahead, first):
            hidden = self.decoder(input_ids=ids.to(device), attention_mask=mask, position_ids=position_ids,
                                  use_cache=True, **{self._cache_kwarg: self.kv}).last_hidden_state  # [n, T, D]
            last = hidden[torch.arange(len(members), device=device), torch.tensor(counts, device=device) - 1]  # [n, D]
            logits = self.lm_head(last).float()  # [n, V]: the head runs on one position per row only
        self.kv.commit()
        return list(logits.split([self.running[i].width for i in requests]))  # [k, V] per request

    def _first_row(self, index: int) -> int:
        """The batch (KV cache) row where running request `index`'s rows begin."""
        return sum(request.width for request in self.running[:index])

    @property
    def rows_in_use(self) -> int:
        """Batch rows the running requests occupy (a mixture of k experts takes k)."""
        return sum(request.width for request in self.running)

    def _accept_token(self, request: Request, token: int) -> str | None:
        """Record one sampled token and stream its text; returns a finish reason or None."""
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            self.stats.latency["ttft"].observe(now - request.created)
        request.generated.append(token)
        if token in self.eos_ids and not request.params.ignore_eos:
            return "stop"
        text = request.stream.add(token)
        if text:
            self._emit(request, Delta(text, [token]))
        if request.stream.stopped:
            return "stop"
        if len(request.generated) >= request.params.max_tokens:
            return "length"
        return None

    @contextlib.contextmanager
    def _select(self, slots: list[int], ahead: int | None, first: int) -> Iterator[None]:
        if self.lora is None:
            yield
            return
        with self.lora.select(slots, ahead, first):
            yield

    # -- admission and retirement -----------------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        with self._lock:
            while self._inbox:
                self.waiting.append(self._inbox.popleft())
            removed = set(self._removed)
            self._removed.clear()
        if removed:
            for request in [r for r in self.waiting if removed.intersection(r.experts)]:
                gone = sorted(removed.intersection(request.experts))[0]
                self._fail_waiting(request, ExpertRemoved(
                    f"expert '{gone}' was removed from this server while the request waited"))

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for request in list(self.waiting):
            if request.cancelled:
                self._fail_waiting(request, Cancelled("the client cancelled the request"))
            elif request.deadline is not None and now > request.deadline:
                self._fail_waiting(request, RequestTimeout("the request timed out while waiting for capacity"))
        for row in reversed(range(len(self.running))):
            request = self.running[row]
            if request.cancelled:
                self._retire(row, failure=Cancelled("the client cancelled the request"))
            elif request.deadline is not None and now > request.deadline:
                self._retire(row, failure=RequestTimeout(
                    f"the request did not finish within {self.config.request_timeout_s:g} s"))

    def _admit(self) -> None:
        for request in list(self.waiting):
            if self.rows_in_use + request.width > self.config.max_batch:
                return  # first come, first served: a mixture waiting for k rows is not overtaken by single rows
            if self.running and any(self._still_loading(expert) for expert in request.experts):
                continue  # an adapter is still coming from disk: let the running rows decode meanwhile
            if not self._acquire_slots(request):
                continue
            self.waiting.remove(request)
            with self._lock:
                self._queued -= 1
            first = self.rows_in_use
            for row in range(first, first + request.width):
                self.kv.reset_row(row)
            self.running.append(request)
            self.stats.tokens.add("prompt", len(request.prompt_ids))

    def _still_loading(self, expert: str) -> bool:
        if self.cache.is_resident(expert):
            return False
        future = self.cache.prefetch(expert)
        return future is not None and not future.done()

    def _acquire_slots(self, request: Request) -> bool:
        """Give `request` the slot of each of its experts, all or none (on failure it is failed, and False)."""
        slots: list[int] = []
        try:
            for expert in request.experts:
                slots.append(self.cache.acquire(expert))
        except Exception as error:  # ServingError: that request's fault; anything else is a cache bug
            for slot in slots:
                self.cache.release(slot)
            if not isinstance(error, ServingError):  # a cache bug must fail this request, not the scheduler thread
                log.exception("acquiring %s failed", request.expert)
            self._fail_waiting(request, _internal_error(error))
            return False
        request.slots = slots or [-1]
        return True

    def _fail_waiting(self, request: Request, error: ServingError) -> None:
        self.waiting.remove(request)
        with self._lock:
            self._queued -= 1
        self._finish(request, failure=error)

    def _retire(self, row: int, reason: str | None = None, failure: ServingError | None = None) -> None:
        """Take running request `row` out, all of its batch rows, and tell its client."""
        request = self.running[row]
        self._close_gap(row)
        for slot in request.slots:
            if slot >= 0:
                self.cache.release(slot)
        request.slots = [-1] * request.width
        if failure is None:
            tail = request.stream.finish()
            if tail:
                self._emit(request, Delta(tail, []))
        self._finish(request, reason=reason, failure=failure)

    def _close_gap(self, index: int) -> None:
        """Remove running request `index` and keep the KV rows contiguous: the last request moves into its rows
        when it is as wide (one group of row copies, as with single rows), else every later row shifts down."""
        start, width = self._first_row(index), self.running[index].width
        last = len(self.running) - 1
        if index != last and self.running[last].width == width:
            source = self._first_row(last)
            for offset in range(width):
                self.kv.move_row(source + offset, start + offset)
            self.running[index] = self.running.pop()
            return
        end = self.rows_in_use
        for row in range(start + width, end):
            self.kv.move_row(row, row - width)
        self.running.pop(index)

    def _finish(self, request: Request, reason: str | None = None, failure: ServingError | None = None) -> None:
        if failure is not None:
            outcome = {Cancelled: "cancelled", RequestTimeout: "timeout"}.get(type(failure), "error")
            self.stats.requests.add(outcome)
            self._emit(request, Failed(failure))
            return
        self.stats.requests.add(reason)
        self.stats.latency["request"].observe(time.monotonic() - request.created)
        self._emit(request, Finished(reason, len(request.prompt_ids), len(request.generated)))

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # a broken consumer only loses its own request
            log.exception("sink of %s failed; cancelling it", request.id)
            request.cancelled = True

    def _on_removed(self, expert: str) -> None:
        with self._lock:
            self._removed.append(expert)
        self._wake()

    def _wake(self) -> None:
        self._wake_event.set()

    # -- running ----------------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the scheduler on a background thread."""
        if self._thread is None:
            self._stop = False
            threads = self.config.torch_threads or torch.get_num_threads()
            self._thread = threading.Thread(target=self._loop, args=(threads,), name="upcycle-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self, torch_threads: int) -> None:
        # OpenMP's thread count is per calling thread: without this the engine thread would use the default (all
        # cores) whatever the creating thread chose, and on shared cores those extra threads spin against others.
        torch.set_num_threads(torch_threads)
        failures = 0  # steps in a row that raised
        while not self._stop:
            try:
                busy = self.step()
                failures = 0
            except Exception as error:  # a bug outside one request: its state is suspect, so fail what is in flight
                failures += 1
                log.exception("engine step failed (%d in a row)", failures)
                self._fail_in_flight(_internal_error(error))
                if failures >= MAX_FAILED_STEPS:
                    self._die(error)
                    return
                continue
            if not busy:
                self._wake_event.wait(0.05)
                self._wake_event.clear()

    def _fail_in_flight(self, error: ServingError) -> None:
        """Fail every waiting and running request (after an error that may have left them half-updated)."""
        self._take_inbox()
        for request in list(self.waiting):
            self._fail_waiting(request, error)
        for row in reversed(range(len(self.running))):
            self._retire(row, failure=error)

    def _die(self, error: Exception) -> None:
        """Give up after repeated failures: refuse new requests with the reason (503) and let /health say so."""
        with self._lock:
            self._accepting = False
            self.failure = f"{type(error).__name__}: {error}"[:300]
        log.critical("the engine stopped: %s", self.failure)
        self._fail_in_flight(Overloaded(f"the engine stopped after an internal error ({self.failure})"))

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step on the calling thread until nothing waits or runs (tests and benchmarks); returns the step count."""
        for steps in range(max_steps):
            if not self.step() and not self._inbox and not self.waiting:
                return steps
        raise RuntimeError("engine did not become idle")

    @property
    def is_running(self) -> bool:
        """True while the scheduler thread runs."""
        return self._thread is not None and self._thread.is_alive() and not self._stop

    @property
    def is_dead(self) -> bool:
        """True when the scheduler thread ended without being stopped (it gave up, or was killed)."""
        started = self._thread is not None
        return self.failure is not None or (started and not self._stop and not self._thread.is_alive())

    @property
    def idle(self) -> bool:
        return not self.running and self.queue_depth == 0

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests, let queued and running ones finish (up to `timeout` s), then stop the thread.

        What is still unfinished then fails with Overloaded (503): clients get an answer, not a cut connection.
        """
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while drain and self._thread is not None and not self.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._stop_lock:
            self._stop = True
            self._wake()
            if self._thread is not None:
                self._thread.join(timeout=10)
                self._thread = None
            self._take_inbox()
            for request in list(self.waiting):
                self._fail_waiting(request, Overloaded("the server shut down before the request ran"))
            for row in reversed(range(len(self.running))):
                self._retire(row, failure=Overloaded("the server shut down during generation"))

    def close(self) -> None:
        """Stop (without draining) and release the cache's threads."""
        self.stop(drain=False)
        if self.cache is not None:
            self.cache.close()

    # -- convenience ------------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], expert: str | Sequence[str] | None = None,
                 params: SamplingParams | None = None, timeout: float | None = 120.0,
                 weights: Sequence[float] | None = None) -> Completion:
        """Blocking single generation (the engine thread must be running). Raises the request's ServingError."""
        events: queue.Queue[Event] = queue.Queue()
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        request = self.submit(ids, expert, params, events.put, weights)
        text = []
        while True:
            event = events.get(timeout=timeout)
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return Completion("".join(text), request.generated, event.reason, event.prompt_tokens,
                                  request.expert)


MAX_FAILED_STEPS = 3
"""Scheduler steps in a row that may raise before the engine gives up (one is a glitch, three are a broken state)."""

T = TypeVar("T")


def forward_groups(tokens: list[int], widths: list[int], max_padding: int) -> list[list[int]]:
    """The forwards of one step, as lists of running-request indices: all requests in one forward, unless that would
    pad the decoding requests' rows (1 token each) by more than `max_padding` positions in all; then each
    contiguous run of decoding or of prefilling requests is a forward of its own.

    One forward pads every row to the longest input, so a decoding row batched with a 48-token prompt computes 48
    positions. On SmolLM2-135M (one thread), the step where a 48-token prompt joined 15 decoding rows took 2.3 s
    padded and 0.37 s as two forwards (a decode step alone: 0.15 s). A separate forward costs one more read of the
    weights, which `max_padding` prices."""
    longest = max(tokens, default=0)
    padding = sum(width * (longest - 1) for count, width in zip(tokens, widths, strict=True) if count == 1)
    if padding <= max_padding:
        return [list(range(len(tokens)))] if tokens else []
    runs = itertools.groupby(range(len(tokens)), key=lambda index: tokens[index] == 1)
    return [list(run) for _, run in runs]


def _per_row(rows: list[int], batched: Callable[[list[int]], list[T]]) -> tuple[dict[int, T], dict[int, Exception]]:
    """({row: result}, {row: error}) of `batched` over `rows`; if the batch raises, each row is retried on its own,
    so one request's failure fails that request only (the rare failing step pays one call per row)."""
    if not rows:
        return {}, {}
    try:
        return dict(zip(rows, batched(rows), strict=True)), {}
    except Exception as error:
        if len(rows) <= 1:
            log.exception("step failed for row %s", rows)
            return {}, dict.fromkeys(rows, error)
        log.exception("a batched step over %d rows failed; retrying each row alone", len(rows))
    results: dict[int, T] = {}
    failures: dict[int, Exception] = {}
    for row in rows:
        try:
            [results[row]] = batched([row])
        except Exception as error:
            failures[row] = error
    return results, failures


def _next_token_scores(request: Request, logits: torch.Tensor) -> torch.Tensor:
    """What `request` samples its next token from: its row's logits [V], or for a mixture of k rows ([k, V]) the
    log of the weighted mixture of their distributions (float64)."""
    if request.width == 1:
        return logits[0]
    return mixture_scores(logits, torch.tensor(request.weights, dtype=torch.float64, device=logits.device))


def _stack(scores: list[torch.Tensor]) -> torch.Tensor:
    """[n, V] of n requests' scores; float64 when a mixture is among them (its log-probabilities stay exact)."""
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores) else scores[0].dtype
    return torch.stack([s.to(dtype) for s in scores])


def _internal_error(error: Exception) -> ServingError:
    """What a client is told when its request hit an unexpected error (the traceback stays in the server log)."""
    if isinstance(error, ServingError):
        return error
    return ServingError(f"internal error during generation: {type(error).__name__}: {str(error)[:200]}")


def _compatibility_check(lora: MultiLoRA) -> Callable[[str, AdapterWeights], None]:
    """A cache check refusing adapters the wrapped model cannot hold (unwrapped layer, rank, shapes)."""

    def check(expert: str, weights: AdapterWeights) -> None:
        for name, (a, b) in weights.shapes().items():
            layer = lora.layers.get(name)
            if layer is None:
                raise AdapterError(f"it targets {name}, which this server did not wrap (restart with a "
                                   f"target_modules that includes it)")
            if a[0] > lora.max_rank:
                raise AdapterError(f"its rank {a[0]} exceeds the server's max_rank {lora.max_rank}")
            if a[1] != layer.in_features or b[0] != layer.out_features:
                raise AdapterError(f"{name}: shapes A {a}, B {b} do not fit a "
                                   f"{layer.in_features}->{layer.out_features} layer (another base model?)")

    return check
