"""The routed introvert-experts model as an lm-evaluation-harness `LM`, so any harness task can score it.

Each request is routed as a whole (its context) to one expert, exactly as serving does; registered as
`upcycle-introvert`: `lm_eval --model upcycle-introvert --model_args run=RUN --tasks ...`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from upcycle.introvert.model import IntrovertExperts
from upcycle.serving.router import AUTO


@register_model("upcycle-introvert")
class IntrovertLM(LM):
    """lm-eval adapter: routes on the request context, scores continuations with that expert."""

    def __init__(self, run: str | None = None, experts: IntrovertExperts | None = None, expert: str = AUTO,
                 max_length: int = 1024, **_: object) -> None:
        super().__init__()
        self.experts = experts if experts is not None else IntrovertExperts.from_run(run)
        self.expert = expert
        self.max_length = max_length

    def _expert_for(self, text: str) -> str | None:
        return self.experts.route([text])[0] if self.expert == AUTO else self.expert

    @torch.no_grad()
    def _continuation_logprob(self, context: str, continuation: str) -> tuple[float, bool]:
        tok = self.experts.tokenizer
        ctx = tok(context, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        ids = (ctx + cont)[-self.max_length:]
        n_cont = min(len(cont), len(ids) - 1)
        with self.experts.using(self._expert_for(context)) as model:
            logits = model(input_ids=torch.tensor([ids], device=self.experts.device)).logits[0].float()
        logprobs = F.log_softmax(logits[-n_cont - 1:-1], dim=-1)
        target = torch.tensor(ids[-n_cont:], device=logprobs.device)
        chosen = logprobs.gather(1, target[:, None]).squeeze(1)
        return float(chosen.sum()), bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return [self._continuation_logprob(*request.args) for request in requests]

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [request.args[0] for request in requests]
        experts = [self._expert_for(t) for t in texts]
        return [-total for total, _ in self.experts.token_nll(texts, experts, block_size=self.max_length)]

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            generation = self.experts.generate(context, max_new_tokens=kwargs.get("max_gen_toks", 64),
                                               temperature=float(kwargs.get("temperature", 0.0)), expert=self.expert)
            text = generation.text
            for stop in kwargs.get("until", []) or []:
                text = text.split(stop)[0]
            out.append(text)
        return out
