"""Throughput of a real base on this machine: LoRA training, full training, forward, and greedy decode.

Prints one JSON object measured in one run, so every figure shares the machine's load at that time:
- LoRA training tokens/s: rank 8 on all seven projections, batch 4 x 256 tokens, AdamW, the shared training step;
- full training tokens/s: every weight trained, same batch (the cost of the 'full' baseline);
- forward tokens/s at batch 1 and 16 (256 tokens each, no gradient);
- greedy decode tokens/s with `generate` (KV cache) at batch 1 and 16;
- peak resident memory of the process after each phase.

Each phase runs one warm-up step and then --steps timed steps; the median step is reported. The load average
before and after is recorded: compare figures only within one run. float32, torch.set_num_threads(--threads).

    python benchmarks/real_model.py [--base smollm2-135m] [--threads 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(step, steps: int) -> float:
    step()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(model, parameters, batch: torch.Tensor):
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import get_peft_model

    from upcycle.models.base import load_base
    from upcycle.training.config import LoraSettings

    load_start = time.perf_counter()
    model, tokenizer = load_base(args.base, device="cpu")
    result: dict = {"base": args.base, "parameters": sum(p.numel() for p in model.parameters()),
                    "load_seconds": round(time.perf_counter() - load_start, 2), "threads": args.threads,
                    "torch": torch.__version__, "machine": platform.machine(), "load_before": os.getloadavg()[0],
                    "peak_rss_mb": {"loaded": round(peak_rss_mb())}}
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def tokens(batch: int, length: int = 256) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=generator)

    with torch.no_grad():
        for batch in (1, 16):
            ids = tokens(batch)
            seconds = median_seconds(lambda ids=ids: model(ids), args.steps)
            result[f"forward_tokens_per_s_batch{batch}"] = round(ids.numel() / seconds, 1)
    result["peak_rss_mb"]["forward"] = round(peak_rss_mb())

    for batch in (1, 16):
        prompt = tokens(batch, 16)
        mask = torch.ones_like(prompt)

        def decode(prompt=prompt, mask=mask):
            model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=args.decode_tokens,
                           min_new_tokens=args.decode_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

        seconds = median_seconds(decode, max(1, args.steps - 1))
        result[f"decode_tokens_per_s_batch{batch}"] = round(batch * args.decode_tokens / seconds, 1)
    result["peak_rss_mb"]["decode"] = round(peak_rss_mb())

    batch = tokens(4)
    lora = get_peft_model(model, LoraSettings(rank=8).peft_config())
    lora.train()
    seconds = median_seconds(training_step(lora, [p for p in lora.parameters() if p.requires_grad], batch),
                             args.steps)
    result["lora_train_tokens_per_s"] = round(batch.numel() / seconds, 1)
    result["peak_rss_mb"]["lora_train"] = round(peak_rss_mb())
    model = lora.unload()
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    seconds = median_seconds(training_step(model, list(model.parameters()), batch), args.steps)
    result["full_train_tokens_per_s"] = round(batch.numel() / seconds, 1)
    result["peak_rss_mb"]["full_train"] = round(peak_rss_mb())
    result["full_over_lora_train"] = round(result["full_train_tokens_per_s"] / result["lora_train_tokens_per_s"], 3)
    result["decode16_over_decode1"] = round(result["decode_tokens_per_s_batch16"] /
                                            result["decode_tokens_per_s_batch1"], 2)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
