"""CLI commands of the mask experts (MoM): `upcycle masks train | analyze | sweep`. Each signature is its command
line; the settings are the dataclasses of `upcycle.masks.config`, the work happens in
`upcycle.masks.experiments.end_to_end` (one run) and `upcycle.masks.experiments.sweep` (every method, every target).
"""

from __future__ import annotations

from dataclasses import replace

from upcycle.data.splits import SplitConfig
from upcycle.masks.config import BaselineSettings, MaskTrainConfig


def train(base: str = "default", out: str = "runs/masks", data: str = "stdlib", eval_blocks: int = 64,
          compact: bool = True, recipe: MaskTrainConfig = MaskTrainConfig(),
          splits: SplitConfig = SplitConfig()) -> None:
    """Learn mask experts on a frozen base until a target fraction of FFN neurons is active per token; resumable.

    Writes OUT/masks.json (settings, training curve, held-out perplexity dense vs masked, achieved active ratio,
    FLOPs), OUT/masks.safetensors, OUT/analysis.json (shared / token-specific / inactive experts) and, with
    --compact, OUT/compact/ (the compacted model; load with upcycle.masks.method.export.load_compact).

    Args:
        base: Base causal LM (a Llama/Mistral/Qwen2-style Hugging Face directory or hub id; 'default': the shipped
            tiny Llama).
        out: Run directory.
        data: Corpus: a folder of text files, a .txt/.jsonl/.parquet file, 'hf:NAME[:CONFIG][@SPLIT]', or 'stdlib'.
        eval_blocks: Held-out blocks for perplexity and the expert analysis.
        compact: Also compact the model and export it to OUT/compact.
        recipe: Target active ratio, mask experts (--recipe.masks.*), the Lagrangian and the optimisation of the
            shared loop (--recipe.train.*; its seed also seeds the masks' initialisation).
        splits: Held-out fractions (the split is by a hash of each document's text).
    """
    from upcycle.masks.experiments.end_to_end import train_run

    meta = train_run(base, recipe, out, data, splits, eval_blocks, compact)
    if meta is None:  # a rank other than 0 under DDP: rank 0 saved and reports
        return
    ev = meta["evaluation"]
    layers = ", ".join(f"{r:.0%}" for r in ev["layer_active_ratios"].values())
    test = "" if ev["masked_test_perplexity"] is None else \
        f", test {ev['masked_test_perplexity']:.2f} (dense {ev['dense_test_perplexity']:.2f})"
    print(f"{out}: {ev['achieved_active_ratio']:.1%} of FFN neurons active per token (target {recipe.target:.0%}; "
          f"layers {layers}); validation perplexity {ev['masked_perplexity']:.2f} "
          f"(dense {ev['dense_perplexity']:.2f}){test}; experts {ev['experts']}; "
          f"whole-model FLOPs x{ev['flops']['total_ratio']:.2f}")
    if "skipped" in meta.get("compact", {}):
        print(f"{out}: {meta['compact']['skipped']}")


def analyze(run: str, base: str | None = None, eval_blocks: int = 32) -> None:
    """Classify a mask run's experts as shared, token-specific or inactive over held-out tokens.

    Rewrites RUN/analysis.json, writes RUN/analysis.md (a table per layer) and RUN/experts.png (expert kinds, neuron
    kinds with the active ratio, and each expert's usage, per layer), and prints one line per layer.

    Args:
        run: Run directory made by `upcycle masks train`.
        base: The base the masks were trained on (default: the path recorded in the run).
        eval_blocks: Held-out blocks to analyse.
    """
    from upcycle.masks.experiments.end_to_end import analyze_run

    summary = analyze_run(run, base, eval_blocks)
    for layer in summary["layers"]:
        kinds = {k: layer["expert_kinds"].count(k) for k in ("shared", "token-specific", "inactive")}
        print(f"{layer['name']}: active {layer['active_ratio']:.1%}, experts {kinds}, neurons {layer['neuron_kinds']}")
    print(f"{run}: {summary['active_ratio']:.1%} active over {summary['tokens']} tokens; experts {summary['experts']}; "
          f"{run}/analysis.md, {run}/experts.png")


def export(run: str, out: str | None = None, base: str | None = None, eval_blocks: int = 32,
           max_ratio: float = 1.25) -> None:
    """Write a finished mask run's fast model: the compacted FFNs (shared block + expert blocks), loadable with
    `upcycle.masks.method.export.load_compact` and by `upcycle generate --base` / `upcycle serve --base`.

    Args:
        run: Run directory made by `upcycle masks train`.
        out: Where to write the model (default RUN/compact).
        base: The base the masks were trained on (default: the path recorded in the run).
        eval_blocks: Held-out blocks whose routing decides which experts are never used (they are removed).
        max_ratio: Refuse a model storing more than this many times the dense FFNs' weights.
    """
    from upcycle.masks.experiments.end_to_end import export_run

    entry = export_run(run, out, base, eval_blocks, max_ratio)
    print(f"{entry['path']}: {entry['packed_rows_ratio']:.2f}x the dense FFN rows ({entry['bytes'] / 2**20:.1f} MiB), "
          f"largest |logit| difference from the masked model {entry['max_abs_logit_difference']:.2g}")


def generate(model: str, prompt: str, max_new_tokens: int = 64) -> None:
    """Greedy continuation of a prompt by an exported mask model, with its decode speed (tokens per second).

    Args:
        model: A directory written by `upcycle masks export` (or `masks train`'s RUN/compact).
        prompt: The text to continue.
        max_new_tokens: Tokens to generate.
    """
    import time

    from transformers import AutoTokenizer

    from upcycle.masks.method.export import load_compact

    lm = load_compact(model)  # refuses, in one line, a directory that is not an exported mask model
    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(f"{prompt}{tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}")
    print(f"[{new} tokens in {seconds:.2f} s: {new / max(seconds, 1e-9):.1f} tokens/s]")


def sweep(base: str = "default", out: str = "runs/masks-sweep", data: str = "stdlib", eval_blocks: int = 64,
          targets: list[float] = [0.25, 0.5, 0.75],  # noqa: B006 - CLI default
          methods: list[str] = ["masks", "moefication", "pruning", "teal"],  # noqa: B006 - CLI default
          recipe: MaskTrainConfig = MaskTrainConfig(), baselines: BaselineSettings = BaselineSettings(),
          latency_rounds: int = 9, latency_threads: int = 1, splits: SplitConfig = SplitConfig()) -> None:
    """Mask experts and baselines at each target active ratio: held-out perplexity, active ratio per layer, latency.

    Methods: masks (learned mask experts, compacted), moefication (neuron clusters + fitted router), pruning
    (structured magnitude pruning + FFN fine-tuning on as many tokens as the masks train on), teal (training-free
    activation thresholds). Writes OUT/masks-<t>/ (one mask run each), OUT/sweep.json, OUT/report.md (tables)
    and OUT/pareto.png (perplexity against active FFN fraction and against measured latency).

    Args:
        base: Base causal LM (as for `upcycle masks train`).
        out: Sweep directory.
        data: Corpus spec (as for `upcycle masks train`).
        eval_blocks: Held-out blocks per split for perplexity and active ratios.
        targets: Target active ratios, each in (0, 1]; each replaces --recipe.target.
        methods: Which of masks, moefication, pruning, teal to run.
        recipe: The mask runs' settings (as for `upcycle masks train`); the pruning fine-tune takes the same steps,
            batch and blocks.
        baselines: Settings of the baselines that the mask recipe does not fix.
        latency_rounds: Interleaved timing rounds (the median is reported).
        latency_threads: torch threads while timing (1 is the steadiest on a small shared machine).
        splits: Held-out fractions.
    """
    from upcycle.masks.experiments.sweep import sweep_runs

    # one config per target first: validates them all before the first run starts
    configs = [replace(recipe, target=t) for t in targets]
    summary = sweep_runs(base, targets, configs[0], out, data, splits, eval_blocks, tuple(methods), baselines,
                         latency_rounds, latency_threads)
    for point in summary["points"]:
        print(f"{point['method']:>11} target {point['target']:.0%}: active {point['achieved_active_ratio']:.1%}, "
              f"{summary['quality_split']} perplexity {point['perplexity']:.2f}, decode "
              f"x{point['decode_speedup']:.2f}, prefill x{point['prefill_speedup']:.2f}")
    print(f"{out}/report.md, {out}/sweep.json, {out}/pareto.png")
