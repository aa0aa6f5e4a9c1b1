"""Wall-clock speed of exported mask-expert models beside the dense base they came from, on this CPU.

Prints one JSON object measured in one run. Every model is what `upcycle masks train` / `upcycle masks export` write
(`upcycle.masks.method.export.load_compact`), timed through the same forward that `generate` and `serve` use:
- each `--model DIR` (an exported compact model; its dense base is read from the mask run it records);
- `--tinyllama`: TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 32 / 4 heads, vocab 32000), first `--layers`
  blocks, random weights. A documented stand-in, since masks cannot be trained at that size here: partition masks
  built by the library's own path (clusters init on the FFN inputs of random tokens, `partition_slack` 0, so every
  kept gate is open and a token uses exactly the target share), compacted by `compact_model`. Speed depends on the
  layout (shared rows, rows per expert, experts), which is the one a trained run of these settings exports.

Per model, dense timed in the same round-robin rounds (median over rounds):
- FFN: one layer (the middle one), inputs captured from real text, decode-shaped [B, 1, D] at batch 1 and 8;
- decode: ms per token through the KV cache at batch 1 and 8 (teacher-forced, so every model sees the same tokens);
- prefill: ms for a [B, --prompt] block at batch 1 and 8.

    python benchmarks/masks.py --model runs/masks-0.5/compact [--model ...] [--tinyllama] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch

from upcycle.io import read_json
from upcycle.masks.experiments.latency import decode_seconds_per_step, per_call, round_robin
from upcycle.masks.method.compact import compact_layers
from upcycle.masks.method.export import SECTION, load_compact

BATCHES = (1, 8)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000)


def exported_pair(directory: Path) -> tuple[str, torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(label, dense base, exported model, real-text token blocks) for a model written by `masks export`."""
    from upcycle.data import SplitConfig
    from upcycle.data.blocks import corpus_blocks
    from upcycle.masks.experiments.run_dir import read_meta
    from upcycle.models.base import load_base, resolve_base

    section = read_json(directory / "config.json")[SECTION]
    meta = read_meta(section["masks_run"])
    dense, tokenizer = load_base(resolve_base(meta["base"]["path"]))
    blocks = corpus_blocks(tokenizer, meta["data"], SplitConfig(**meta["splits"]), 128, names=("train", "validation"),
                           required=("validation",), train_tokens=1, eval_blocks=8)["validation"][0]
    label = f"{Path(meta['base']['path']).name} {meta['masks'].get('layout', 'overlap')} target {section['target']}"
    return label, dense.eval(), load_compact(directory), blocks


def tinyllama_pair(layers: int, target: float, experts: int) -> tuple[str, torch.nn.Module, torch.nn.Module,
                                                                       torch.Tensor]:
    """(label, dense, compacted partition stand-in, random token blocks) at TinyLlama's shape (module docstring)."""
    import copy

    from upcycle.masks.config import MaskConfig, MaskTrainConfig
    from upcycle.masks.method.compact import compact_model
    from upcycle.masks.method.train import prepare_masked_model

    dense = random_decoder(TINYLLAMA | {"num_hidden_layers": layers})
    blocks = torch.randint(0, TINYLLAMA["vocab_size"], (16, 128), generator=torch.Generator().manual_seed(1))
    sparse = copy.deepcopy(dense)
    config = MaskTrainConfig(target=target, masks=MaskConfig(experts=experts, layout="partition",
                                                             partition_slack=0.0), cluster_tokens=2048)
    prepare_masked_model(sparse, config, blocks)
    compact_model(sparse.eval())
    return f"tinyllama-shape ({layers} layers, random weights) partition target {target}", dense, sparse, blocks


def random_decoder(shape: dict):
    """A Llama of `shape` with uniform random weights (fast to build, unit-variance activations, no denormals)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                bound = (3.0 / param.shape[-1]) ** 0.5
                param.uniform_(-bound, bound, generator=g)
    return model.eval()


@torch.no_grad()
def bench_pair(dense: torch.nn.Module, sparse: torch.nn.Module, blocks: torch.Tensor, rounds: int, prompt: int,
               decode_steps: int) -> dict:
    """FFN, decode and prefill of `sparse` against `dense` at each batch size, interleaved in the same rounds."""
    from upcycle.masks.method.ffn_inputs import collect_ffn_inputs

    name, layer = compact_layers(sparse)[len(compact_layers(sparse)) // 2]
    dense_mlp = dict(dense.named_modules())[name]
    x = collect_ffn_inputs(dense, blocks[:2], max_tokens=256)[name]  # [T, D] real FFN inputs
    ids = blocks[:max(BATCHES), :prompt + decode_steps]
    measures = {}
    for batch in BATCHES:
        step = x[:batch, None, :]  # [B, 1, D]
        for kind, model, mlp in (("dense", dense, dense_mlp), ("sparse", sparse, layer)):
            measures[f"ffn/{batch}/{kind}"] = per_call(partial(mlp, step), 0.05)
            measures[f"decode/{batch}/{kind}"] = partial(decode_seconds_per_step, model, ids[:batch], prompt)
            measures[f"prefill/{batch}/{kind}"] = per_call(
                partial(model, input_ids=ids[:batch, :prompt], logits_to_keep=1), 0.05)
    times = round_robin(measures, rounds)
    out = {"layer": name, "sizes": layer.ffn.sizes, "intermediate": layer.ffn.intermediate,
           "stored_rows_ratio": sum(layer.ffn.sizes) / layer.ffn.intermediate}
    for batch in BATCHES:
        chosen = layer.router.choose(x[:batch])
        active = float(layer.ffn.active_neurons(chosen).double().mean())
        out[f"active_ratio_batch{batch}"] = active / layer.ffn.intermediate
        for what in ("ffn", "decode", "prefill"):
            d, s = times[f"{what}/{batch}/dense"], times[f"{what}/{batch}/sparse"]
            out[f"{what}_batch{batch}"] = {"dense_ms": 1e3 * d, "sparse_ms": 1e3 * s, "speedup": d / s}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], type=Path, help="an exported compact model dir")
    parser.add_argument("--tinyllama", action="store_true", help="add the TinyLlama-shape stand-in")
    parser.add_argument("--layers", type=int, default=8, help="TinyLlama-shape blocks (of 22)")
    parser.add_argument("--target", type=float, default=0.5, help="the stand-in's active share")
    parser.add_argument("--experts", type=int, default=8, help="the stand-in's experts per FFN")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median reported)")
    parser.add_argument("--prompt", type=int, default=64, help="prefill tokens, and the prompt before decode")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    result = {"benchmark": "masks", "device": platform.processor() or platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "dtype": "float32", "statistic": "median over round-robin rounds",
              "load_average_at_start": os.getloadavg(), "models": {}}
    pairs = [exported_pair(d) for d in args.model]
    if args.tinyllama:
        pairs.append(tinyllama_pair(args.layers, args.target, args.experts))
    for label, dense, sparse, blocks in pairs:
        result["models"][label] = bench_pair(dense, sparse, blocks, args.rounds, args.prompt, args.decode_steps)
    result["load_average_at_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
