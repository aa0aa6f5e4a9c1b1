"""CLI commands of the mask experts (MoM): `upcycle masks train | analyze | sweep`. Each signature is its command
line; the work happens in `upcycle.masks.pipeline`.
"""

from __future__ import annotations

from upcycle.data.splits import SplitConfig


def _config(target: float, experts: int, top_k: int, routing: str, steps: int, batch_size: int, lr: float,
            block_size: int, warmup_fraction: float, lambda_lr: float, seed: int, init: str, train_routers: bool):
    from upcycle.masks.config import MaskConfig, MaskTrainConfig
    from upcycle.masks.train import _default_train
    from upcycle.training.config import TrainConfig

    defaults = _default_train()
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(defaults.warmup_steps, steps),
                        min_lr_ratio=defaults.min_lr_ratio, checkpoint_every=max(1, steps // 10), seed=seed)
    return MaskTrainConfig(target=target, masks=MaskConfig(experts=experts, top_k=top_k, routing=routing, init=init),
                           warmup_fraction=warmup_fraction, lambda_lr=lambda_lr, block_size=block_size, train=train,
                           train_routers=train_routers)


def train(base: str = "default", target: float = 0.5, experts: int = 128, out: str = "runs/masks", top_k: int = 1,
          routing: str = "topk", init: str = "clusters", train_routers: bool = False, steps: int = 2400,
          batch_size: int = 8, lr: float = 0.1, block_size: int = 128, warmup_fraction: float = 0.3,
          lambda_lr: float = 0.05, data: str = "stdlib", eval_blocks: int = 64,
          seed: int = 0, compact: bool = True, splits: SplitConfig = SplitConfig()) -> None:
    """Learn mask experts on a frozen base until a target fraction of FFN neurons is active per token; resumable.

    Writes OUT/masks.json (settings, training curve, held-out perplexity dense vs masked, achieved active ratio,
    FLOPs), OUT/masks.safetensors, OUT/analysis.json (shared / token-specific / inactive experts) and, with
    --compact, OUT/compact/ (the compacted model; load with upcycle.masks.export.load_compact).

    Args:
        base: Base causal LM (a Llama/Mistral/Qwen2-style Hugging Face directory or hub id; 'default': the shipped
            tiny Llama).
        target: Fraction of FFN neurons each token should use, in (0, 1].
        experts: Mask experts per FFN layer.
        out: Run directory.
        top_k: Experts per token (topk routing); the token's mask is the union of theirs.
        routing: topk (hard choice, skippable at inference) or soft (probability-weighted mix of all experts).
        init: clusters (expert e starts as k-means cluster e of the FFN inputs: nearest-centroid router, open gates
            ranked by the cluster's use of each neuron) or open (identical open gates, random router).
        train_routers: Also train the routers (needed with --init open; with clusters they stay fixed by default).
        steps: Optimizer steps.
        batch_size: Blocks per step.
        lr: Learning rate of the gates' log α (and of the routers with --train_routers).
        block_size: Tokens per block.
        warmup_fraction: Fraction of the steps over which the target ramps from 1 down to --target.
        lambda_lr: Step size of the Lagrange multipliers' gradient ascent.
        data: Corpus: a folder of text files, a .txt/.jsonl/.parquet file, 'hf:NAME[:CONFIG][@SPLIT]', or 'stdlib'.
        eval_blocks: Held-out blocks for perplexity and the expert analysis.
        seed: Seed for the masks' initialisation and the block sampling.
        compact: Also compact the model and export it to OUT/compact.
        splits: Held-out fractions (the split is by a hash of each document's text).
    """
    from upcycle.masks.pipeline import train_run

    config = _config(target, experts, top_k, routing, steps, batch_size, lr, block_size, warmup_fraction, lambda_lr,
                     seed, init, train_routers)
    meta = train_run(base, config, out, data, splits, eval_blocks, compact)
    if meta is None:  # a rank other than 0 under DDP: rank 0 saved and reports
        return
    ev = meta["evaluation"]
    layers = ", ".join(f"{r:.0%}" for r in ev["layer_active_ratios"].values())
    test = "" if ev["masked_test_perplexity"] is None else \
        f", test {ev['masked_test_perplexity']:.2f} (dense {ev['dense_test_perplexity']:.2f})"
    print(f"{out}: {ev['achieved_active_ratio']:.1%} of FFN neurons active per token (target {target:.0%}; layers "
          f"{layers}); validation perplexity {ev['masked_perplexity']:.2f} (dense {ev['dense_perplexity']:.2f}){test}; "
          f"experts {ev['experts']}; whole-model FLOPs x{ev['flops']['total_ratio']:.2f}")
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
    from upcycle.masks.pipeline import analyze_run

    summary = analyze_run(run, base, eval_blocks)
    for layer in summary["layers"]:
        kinds = {k: layer["expert_kinds"].count(k) for k in ("shared", "token-specific", "inactive")}
        print(f"{layer['name']}: active {layer['active_ratio']:.1%}, experts {kinds}, neurons {layer['neuron_kinds']}")
    print(f"{run}: {summary['active_ratio']:.1%} active over {summary['tokens']} tokens; experts {summary['experts']}; "
          f"{run}/analysis.md, {run}/experts.png")


def sweep(base: str = "default", targets: list[float] = [0.25, 0.5, 0.75], experts: int = 128,  # noqa: B006 - CLI default
          out: str = "runs/masks-sweep", top_k: int = 1, routing: str = "topk", init: str = "clusters",
          train_routers: bool = False, steps: int = 2400, batch_size: int = 8, lr: float = 0.1,
          block_size: int = 128, warmup_fraction: float = 0.3,
          lambda_lr: float = 0.05, data: str = "stdlib", eval_blocks: int = 64, seed: int = 0,
          methods: list[str] = ["masks", "moefication", "pruning", "teal"],  # noqa: B006 - CLI default
          moefication_experts: int = 8, pruning_lr: float = 1e-3, latency_rounds: int = 9, latency_threads: int = 1,
          splits: SplitConfig = SplitConfig()) -> None:
    """Mask experts and baselines at each target active ratio: held-out perplexity, active ratio per layer, latency.

    Methods: masks (learned mask experts, compacted), moefication (neuron clusters + fitted router), pruning
    (structured magnitude pruning + FFN fine-tuning on as many tokens as the masks train on), teal (training-free
    activation thresholds). Writes OUT/masks-<t>/ (one mask run each), OUT/sweep.json, OUT/report.md (tables)
    and OUT/pareto.png (perplexity against active FFN fraction and against measured latency).

    Args:
        base: Base causal LM (as for `upcycle masks train`).
        targets: Target active ratios, each in (0, 1].
        experts: Mask experts per FFN layer.
        out: Sweep directory.
        top_k: Experts per token (topk routing).
        routing: topk or soft.
        init: clusters or open (as for `upcycle masks train`).
        train_routers: Also train the routers (as for `upcycle masks train`).
        steps: Optimizer steps per mask run (and per pruning fine-tune).
        batch_size: Blocks per step.
        lr: Learning rate of the gates' log α (and of the routers with --train_routers).
        block_size: Tokens per block.
        warmup_fraction: Fraction of the steps over which the target ramps down.
        lambda_lr: Step size of the Lagrange multipliers' gradient ascent.
        data: Corpus spec (as for `upcycle masks train`).
        eval_blocks: Held-out blocks per split for perplexity and active ratios.
        seed: Seed for every run.
        methods: Which of masks, moefication, pruning, teal to run.
        moefication_experts: Neuron clusters per FFN for MoEfication (a token uses round(target x experts)).
        pruning_lr: Learning rate of the pruned FFNs' fine-tuning.
        latency_rounds: Interleaved timing rounds (the median is reported).
        latency_threads: torch threads while timing (1 is the steadiest on a small shared machine).
        splits: Held-out fractions.
    """
    from upcycle.masks.config import BaselineSettings
    from upcycle.masks.sweep import sweep_runs

    # built for every target first: validates them all before the first run starts
    configs = [_config(t, experts, top_k, routing, steps, batch_size, lr, block_size, warmup_fraction, lambda_lr,
                       seed, init, train_routers) for t in targets]
    baselines = BaselineSettings(moefication_experts=moefication_experts, pruning_lr=pruning_lr)
    summary = sweep_runs(base, targets, configs[0], out, data, splits, eval_blocks, tuple(methods), baselines,
                         latency_rounds, latency_threads)
    for point in summary["points"]:
        print(f"{point['method']:>11} target {point['target']:.0%}: active {point['achieved_active_ratio']:.1%}, "
              f"{summary['quality_split']} perplexity {point['perplexity']:.2f}, decode "
              f"x{point['decode_speedup']:.2f}, prefill x{point['prefill_speedup']:.2f}")
    print(f"{out}/report.md, {out}/sweep.json, {out}/pareto.png")
