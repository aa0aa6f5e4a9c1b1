"""`IntrovertExperts`: the routed model of a run, as a Python API.

Each request (the whole sequence) is embedded, sent to its nearest cluster centroid, and run through the base with
that cluster's LoRA adapter; adapters are loaded on demand and kept in a small LRU.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from upcycle.errors import UserError
from upcycle.introvert.router import Route
from upcycle.introvert.run import Run, cluster_of
from upcycle.serving.router import AUTO, BASE

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """A generated continuation and the expert that produced it (None: the base alone)."""

    text: str
    expert: str | None
    prompt_tokens: int
    completion_tokens: int


def check_adapter(run: Run, expert: str) -> Path:
    """The expert's directory after checking it is complete and trained on this run's base."""
    from upcycle.io import read_json
    from upcycle.models.base import base_fingerprint

    path = run.expert_dir(expert)
    if not path.is_dir():
        raise UserError(f"{expert} is not trained in {run.path}; run `upcycle introvert train-experts {run.path}`")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"{path} is incomplete (no {name}); delete it and rerun `upcycle introvert train-experts "
                            f"{run.path}`")
    meta_path = path / "train.json"
    if meta_path.is_file():
        trained_on = read_json(meta_path).get("base_fingerprint")
        if trained_on and trained_on != base_fingerprint(run.base):
            raise UserError(f"{expert} was trained on another base model than {run.base}; delete {path} and "
                            "retrain it")
    return path


class IntrovertExperts:
    """A frozen base, a sequence router over cluster centroids, and one LoRA adapter per cluster."""

    def __init__(self, run: Run, base_model, tokenizer, router, max_loaded: int = 64):
        self.run, self.tokenizer, self.router = run, tokenizer, router
        self.base_model = base_model
        self.max_loaded = max_loaded
        self._peft = None  # PeftModel wrapping base_model once the first adapter is loaded
        self._loaded: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_run(cls, path: Run | str | Path, device: str | None = None, max_loaded: int = 64) -> IntrovertExperts:
        """Load a run directory made by `upcycle introvert cluster` and `upcycle introvert train-experts`."""
        from upcycle.introvert.router import load_sequence_router
        from upcycle.models.base import load_base

        run = Run.of(path)
        model, tokenizer = load_base(run.base, device=device)
        return cls(run, model, tokenizer, load_sequence_router(run), max_loaded=max_loaded)

    @property
    def experts(self) -> list[str]:
        """Ids of the trained experts."""
        return self.run.expert_ids()

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    # -- routing --------------------------------------------------------------------------------------------------
    def route(self, texts: list[str]) -> list[str]:
        """The expert id for each text (nearest centroid of its embedding)."""
        return self.router.route(texts)

    # -- adapters -------------------------------------------------------------------------------------------------
    def _activate(self, expert: str) -> None:
        from peft import PeftModel

        if expert in self._loaded:
            self._loaded.move_to_end(expert)
        else:
            path = check_adapter(self.run, expert)
            try:
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(self.base_model, str(path), adapter_name=expert)
                else:
                    self._peft.load_adapter(str(path), adapter_name=expert)
            except Exception as error:  # safetensors / shape errors: the file is not a usable adapter for this base
                raise UserError(f"{expert}: cannot load {path} ({type(error).__name__}: "
                                f"{str(error).splitlines()[0][:160]}); delete it and rerun "
                                f"`upcycle introvert train-experts {self.run.path}`") from None
            self._loaded[expert] = None
            while len(self._loaded) > self.max_loaded:
                old, _ = self._loaded.popitem(last=False)
                self._peft.delete_adapter(old)
        self._peft.set_adapter(expert)

    @contextlib.contextmanager
    def using(self, expert: str | None):
        """Run the block with `expert`'s adapter active (None or 'base': the base alone)."""
        if expert in (None, BASE):
            if self._peft is None:
                yield self.base_model
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
        cluster_of(expert)  # validates the id
        self._activate(expert)
        yield self._peft

    def adapter_parameters(self, expert: str) -> int:
        """Number of LoRA weights of `expert` (loading it if needed)."""
        self._activate(expert)
        return sum(p.numel() for name, p in self._peft.named_parameters() if "lora_" in name and f".{expert}." in name)

    def _resolve(self, texts: list[str], expert: str | None) -> list[str | None]:
        if expert == AUTO:
            return self.route(texts)
        return [expert] * len(texts)

    # -- scoring and generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def token_nll(self, texts: list[str], experts: list[str | None], block_size: int = 256,
                  max_tokens: int | None = None) -> list[tuple[float, int]]:
        """(sum of next-token NLL, predicted tokens) per text, each text run with its own expert."""
        from upcycle.data.packing import tokenize
        from upcycle.eval.perplexity import document_nll

        ids = tokenize(self.tokenizer, texts, max_tokens=max_tokens)
        out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
        for expert in sorted(set(experts), key=str):  # one adapter swap per expert, its texts batched
            group = [i for i in range(len(texts)) if experts[i] == expert]
            with self.using(expert) as model:
                nll, count = document_nll(model, [ids[i] for i in group], self.tokenizer.pad_token_id, block_size)
            for i, total, n in zip(group, nll, count):
                out[i] = (float(total), int(n))
        return out

    @torch.no_grad()
    def token_log_probs(self, ids: Sequence[Sequence[int]], experts: Sequence[Collection[str]], block_size: int = 256,
                        batch_size: int = 16) -> list[dict[str, np.ndarray]]:
        """Per-token log-probabilities of each tokenised document under each of its experts ('base': no adapter):
        out[i][e] for every e in experts[i], in text order (`upcycle.eval.perplexity.document_log_probs`).

        One adapter swap per expert, each expert's documents batched together.
        """
        from upcycle.eval.perplexity import document_log_probs

        out: list[dict[str, np.ndarray]] = [{} for _ in ids]
        for expert in sorted({e for wanted in experts for e in wanted}):
            group = [i for i, wanted in enumerate(experts) if expert in wanted]
            with self.using(expert) as model:
                scored = document_log_probs(model, [ids[i] for i in group], self.tokenizer.pad_token_id, block_size,
                                            batch_size)
            for i, log_probs in zip(group, scored):
                out[i][expert] = log_probs
        return out

    def mixture_nll(self, ids: Sequence[Sequence[int]], routes: Sequence[Route], block_size: int = 256,
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(NLL sum, predicted tokens) of each tokenised document under its route: c-BTM's mixture of the route's
        experts, per token log p(x_t) = logsumexp_i(log w_i + log p_i(x_t)), with the weights fixed per document
        (a route with no clusters: the base). `reference_mixture_nll` is the same as a plain loop."""
        members = [route_members(route) for route in routes]
        scored = self.token_log_probs(ids, [dict(m) for m in members], block_size, batch_size)
        return mix_documents(scored, members)

    def perplexity(self, texts: list[str], expert: str | None = AUTO, block_size: int = 256) -> list[float]:
        """Per-text perplexity with routed experts ('auto'), a named expert, or the base (None / 'base')."""
        scores = self.token_nll(texts, self._resolve(texts, expert), block_size)
        return [math.exp(total / max(count, 1)) for total, count in scores]

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 expert: str | None = AUTO, seed: int = 0) -> Generation:
        """Route `prompt` (unless an expert is named), generate a continuation, and say which expert answered."""
        if max_new_tokens < 1:
            raise UserError("max_new_tokens must be >= 1")
        chosen = self._resolve([prompt], expert)[0]
        encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        if encoded["input_ids"].shape[1] == 0:
            raise UserError("the prompt is empty")
        torch.manual_seed(seed)
        with self.using(chosen) as model:
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None,
                                    top_p=top_p if temperature > 0 else None,
                                    pad_token_id=self.tokenizer.pad_token_id)
        new = output[0, encoded["input_ids"].shape[1]:]
        return Generation(text=self.tokenizer.decode(new, skip_special_tokens=True), expert=chosen,
                          prompt_tokens=encoded["input_ids"].shape[1], completion_tokens=int(new.shape[0]))


def route_members(route: Route) -> list[tuple[str, float]]:
    """(expert, weight) of each member of the route's mixture; the base alone when the route has no clusters."""
    return list(zip(route.experts, route.weights)) if route.clusters else [(BASE, 1.0)]


def mix_documents(scored: Sequence[dict[str, np.ndarray]], members: Sequence[Sequence[tuple[str, float]]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(NLL sum, predicted tokens) per document of the mixtures `members[i]` ((expert, weight) pairs) from the
    per-token log-probabilities `scored[i][expert]`."""
    from upcycle.eval.perplexity import mix_log_probs

    nll = np.array([-mix_log_probs([lp[e] for e, _ in m], [w for _, w in m]).sum() for lp, m in zip(scored, members)])
    count = np.array([len(next(iter(lp.values()))) if lp else 0 for lp in scored], dtype=np.int64)
    return nll, count


@torch.no_grad()
def reference_mixture_nll(experts: IntrovertExperts, ids: Sequence[Sequence[int]], routes: Sequence[Route],
                          block_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 mixture scoring, as a loop (what `IntrovertExperts.mixture_nll` computes in batches):

        for each document, with its route's experts e_i and weights w_i (no clusters: the base, weight 1):
            for each block of block_size consecutive tokens, and each position t >= 1 of the block:
                p_i = softmax(logits of expert e_i run on the block alone)[t - 1] at token t, for every i
                nll += -log(sum over i of w_i * p_i)
    """
    nll, count = [], []
    for seq, route in zip(ids, routes):
        total, n = 0.0, 0
        for start in range(0, len(seq), block_size):
            block = torch.as_tensor(list(seq[start:start + block_size]), dtype=torch.long)[None]  # [1, L]
            if block.shape[1] < 2:
                continue
            mixed = torch.zeros(block.shape[1] - 1, dtype=torch.float64)
            for expert, weight in route_members(route):
                with experts.using(expert) as model:
                    logits = model(input_ids=block.to(experts.device)).logits[0, :-1].double().cpu()
                mixed += weight * torch.softmax(logits, dim=-1).gather(1, block[0, 1:, None])[:, 0]
            total += float(-mixed.log().sum())
            n += block.shape[1] - 1
        nll.append(total)
        count.append(n)
    return np.array(nll), np.array(count, dtype=np.int64)
