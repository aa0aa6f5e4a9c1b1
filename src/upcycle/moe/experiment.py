"""The Flan-MoE experiment: does instruction tuning help a sparse MoE more than a dense model of the same FLOPs?

Grid: {dense, MoE} x {fine-tuned directly, instruction-tuned first} x seeds. Every model is then fine-tuned on the
held-out task types (absent from the instruction mixture) and scored on their test-split responses. The MoE is the
base sparse-upcycled with top-1 (Switch) routing: each token runs one expert that has the dense FFN's size, so its
FLOPs per token equal the dense model's plus a [D, E] router matmul.

Run directory:
    experiment.json             the settings (a rerun with other settings is refused)
    mixture.json                example counts per split and task type
    cells/<stage>/<name>.json   one file per finished cell; a rerun skips them (resumable)
    instruct/<arch>-s<seed>/    instruction-tuned weights, the starting point of the 'instruct' cells
    results.json, report.md, *.png
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from upcycle.errors import UserError
from upcycle.moe.config import CONDITIONS, METRICS, ExperimentConfig

log = logging.getLogger(__name__)


def run_experiment(out: str | Path, config: ExperimentConfig) -> dict:
    """Run every missing cell of the grid, then write results.json and report.md; returns the results."""
    from upcycle.data.instructions import build_mixture
    from upcycle.io import ensure_writable_dir, read_json, write_json
    from upcycle.models.base import resolve_base

    out = ensure_writable_dir(out)
    base = resolve_base(config.base)
    settings = _jsonable(asdict(config)) | {"base": base}
    settings_path = out / "experiment.json"
    finished = list((out / "cells").rglob("*.json"))
    if finished and settings_path.is_file() and read_json(settings_path) != settings:
        raise UserError(f"{out} holds {len(finished)} finished cells of an experiment with other settings; choose a "
                        f"new --out or delete {out}")

    started = time.perf_counter()
    mixture = build_mixture(config.mixture)
    write_json(out / "mixture.json", {"train_tasks": mixture.train_tasks, "held_out": mixture.held_out,
                                      "counts": mixture.counts()})
    eval_set = [e for task in mixture.held_out for e in mixture.examples["test"][task][:config.eval_examples]]
    if not eval_set:
        raise UserError(f"no test-split examples of the held-out task types {', '.join(mixture.held_out)}")
    if not mixture.select("train", mixture.held_out):
        raise UserError(f"no training examples of the held-out task types {', '.join(mixture.held_out)} to "
                        "fine-tune on")

    write_json(settings_path, settings)
    runner = _Runner(out, config, base, mixture, eval_set)
    progress = _progress()
    total = 1 + 3 * len(config.seeds) + 2 * len(config.seeds) * len(CONDITIONS)
    with progress if progress is not None else contextlib.nullcontext():
        task = progress.add_task("moe-experiment", total=total) if progress is not None else None
        runner.progress, runner.task = progress, task
        runner.start("dense", None)
        for seed in config.seeds:
            runner.start("moe", seed)
            for arch in ("dense", "moe"):
                runner.instruct(arch, seed)
            for arch in ("dense", "moe"):
                for condition in CONDITIONS:
                    runner.finetune(arch, condition, seed)
    results = summarise(out, config, runner.cells)
    results["wall_seconds_this_call"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    from upcycle.moe.experiment_report import write_report

    write_report(out, results)
    return results


class _Runner:
    """Runs one cell at a time, skipping cells whose JSON already exists."""

    def __init__(self, out: Path, config: ExperimentConfig, base: str, mixture, eval_set) -> None:
        self.out, self.config, self.base, self.mixture, self.eval_set = out, config, base, mixture, eval_set
        self.cells: dict[str, dict] = {}
        self.progress = self.task = None
        self._tokenizer = None
        self._rows: dict[str, tuple] = {}

    def _done(self, name: str) -> dict | None:
        from upcycle.io import read_json

        path = self.out / "cells" / f"{name}.json"
        if path.is_file():
            self.cells[name] = read_json(path)
            self._advance()
            return self.cells[name]
        return None

    def _finish(self, name: str, cell: dict) -> None:
        from upcycle.io import write_json

        write_json(self.out / "cells" / f"{name}.json", cell)
        self.cells[name] = cell
        self._advance()

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def _model(self, arch: str, seed: int):
        import torch

        from upcycle.moe.instruct import build_model

        torch.manual_seed(seed)
        model, tokenizer = build_model(arch, self.base, self.config.moe, self.config.every, seed)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and self.config.block_size > limit:
            raise UserError(f"block_size {self.config.block_size} exceeds the base's {limit} positions; lower it")
        self._tokenizer = tokenizer
        return model

    def _training_rows(self, tasks: list[str], tokenizer):
        from upcycle.moe.instruct import training_rows

        key = ",".join(tasks)
        if key not in self._rows:
            self._rows[key] = training_rows(tokenizer, self.mixture.select("train", tasks), self.config.block_size)
        return self._rows[key]

    def _evaluate(self, model, tokenizer) -> dict:
        from upcycle.moe.instruct import evaluate_responses

        return evaluate_responses(model, tokenizer, self.eval_set, self.config.block_size)

    def start(self, arch: str, seed: int | None) -> None:
        """The untrained starting point on the held-out test responses (the upcycled MoE depends on the seed)."""
        name = f"start/{arch}" + ("" if seed is None else f"-s{seed}")
        if self._done(name):
            return
        t0 = time.perf_counter()
        model = self._model(arch, seed or 0)
        self._finish(name, {"arch": arch, "seed": seed, "eval": self._evaluate(model, self._tokenizer),
                            "seconds": time.perf_counter() - t0})

    def instruct(self, arch: str, seed: int) -> None:
        """Instruction-tune on the training task types, save the weights, score zero-shot on the held-out tasks."""
        from upcycle.moe.instruct import save_weights, train_stage

        name = f"instruct/{arch}-s{seed}"
        weights = self.out / "instruct" / f"{arch}-s{seed}"
        if weights.is_dir() and self._done(name):
            return
        t0 = time.perf_counter()
        model = self._model(arch, seed)
        inputs, labels, info = self._training_rows(self.mixture.train_tasks, self._tokenizer)
        work = self.out / ".work" / name
        result = train_stage(model, arch, self.config.moe, (inputs, labels), replace(self.config.instruct, seed=seed),
                             work, f"instruct {arch} s{seed}", self.progress)
        save_weights(model, weights)
        cell = {"arch": arch, "seed": seed, "data": info, "train": result.to_dict(),
                "zero_shot": self._evaluate(model, self._tokenizer), "seconds": time.perf_counter() - t0}
        self._finish(name, cell)
        _remove_tree(work)

    def finetune(self, arch: str, condition: str, seed: int) -> None:
        """Fine-tune on the held-out task types (from the base, or from the instruction-tuned weights) and score."""
        from upcycle.moe.instruct import load_weights, train_stage

        name = f"finetune/{arch}-{condition}-s{seed}"
        if self._done(name):
            return
        t0 = time.perf_counter()
        model = self._model(arch, seed)
        if condition == "instruct":
            load_weights(model, self.out / "instruct" / f"{arch}-s{seed}")
        inputs, labels, info = self._training_rows(self.mixture.held_out, self._tokenizer)
        work = self.out / ".work" / name
        result = train_stage(model, arch, self.config.moe, (inputs, labels), replace(self.config.finetune, seed=seed),
                             work, f"finetune {arch}-{condition} s{seed}", self.progress)
        cell = {"arch": arch, "condition": condition, "seed": seed, "data": info, "train": result.to_dict(),
                "eval": self._evaluate(model, self._tokenizer), "seconds": time.perf_counter() - t0}
        self._finish(name, cell)
        _remove_tree(work)


# ---------------------------------------------------------------------------------------------------------------
# Summary statistics



def summarise(out: Path, config: ExperimentConfig, cells: dict[str, dict]) -> dict:
    """Means and 95% CIs over seeds per condition, and the paired (same-seed) differences that answer the question."""
    from upcycle.eval.stats import mean_ci  # numpy: not at import, which the CLI's --help does
    seeds = config.seeds
    tasks = sorted(cells[f"finetune/dense-direct-s{seeds[0]}"]["eval"]["tasks"])
    final = {(arch, cond): [cells[f"finetune/{arch}-{cond}-s{s}"]["eval"] for s in seeds]
             for arch in ("dense", "moe") for cond in CONDITIONS}

    def stats_of(evals: list[dict]) -> dict:
        row = {m: mean_ci([e[m] for e in evals]) for m in (*METRICS, "perplexity")}
        row["tasks"] = {t: {m: mean_ci([e["tasks"][t][m] for e in evals]) for m in METRICS} for t in tasks}
        return row

    def paired(a: list[dict], b: list[dict], metric: str, task: str | None = None) -> dict:
        pick = (lambda e: e[metric]) if task is None else (lambda e: e["tasks"][task][metric])
        return mean_ci([pick(x) - pick(y) for x, y in zip(a, b, strict=True)])

    conditions = {f"{arch}/{cond}": stats_of(evals) for (arch, cond), evals in final.items()}
    # Lower loss is better: a gain is direct - instruct (loss) or instruct - direct (exact match).
    gains, interaction, moe_vs_dense = {}, {}, {}
    for metric, sign in (("loss", 1), ("exact_match", -1)):
        gain = {arch: [sign * (d[metric] - i[metric]) for d, i in zip(final[(arch, "direct")],
                                                                     final[(arch, "instruct")], strict=True)]
                for arch in ("dense", "moe")}
        gains[metric] = {arch: mean_ci(v) for arch, v in gain.items()}
        interaction[metric] = mean_ci([m - d for m, d in zip(gain["moe"], gain["dense"], strict=True)])
        moe_vs_dense[metric] = {cond: paired(final[("moe", cond)], final[("dense", cond)], metric)
                                for cond in CONDITIONS}
    zero_shot = {arch: {m: mean_ci([cells[f"instruct/{arch}-s{s}"]["zero_shot"][m] for s in seeds]) for m in METRICS}
                 for arch in ("dense", "moe")}
    start = {"dense": {m: cells["start/dense"]["eval"][m] for m in METRICS},
             "moe": {m: mean_ci([cells[f"start/moe-s{s}"]["eval"][m] for s in seeds]) for m in METRICS}}
    routing = {name: cell["eval"].get("routing") for name, cell in cells.items()
               if name.startswith("finetune/moe") and cell["eval"].get("routing")}
    seconds = sum(cell.get("seconds", 0.0) for cell in cells.values())
    return {"seeds": seeds, "held_out_tasks": tasks, "conditions": conditions, "instruction_gain": gains,
            "interaction_moe_minus_dense_gain": interaction, "moe_minus_dense": moe_vs_dense,
            "zero_shot_after_instruct": zero_shot, "start": start, "eval_routing": routing,
            "flops": flops_per_token(config), "cell_seconds": seconds,
            "answer": answer(gains, interaction, moe_vs_dense)}


def flops_per_token(config: ExperimentConfig) -> dict:
    """Forward matmul FLOPs per token of the FFNs (the only part that differs) for dense and MoE, from the config."""
    import json

    from upcycle.models.base import resolve_base

    path = Path(resolve_base(config.base)) / "config.json"
    shape = json.loads(path.read_text()) if path.is_file() else {}
    d, f, layers = shape.get("hidden_size"), shape.get("intermediate_size"), shape.get("num_hidden_layers")
    if not (d and f and layers):
        return {}
    moe_layers = len(range(config.every - 1, layers, config.every))
    k = config.moe.top_k or 1  # expert choice: on average cf experts per token; reported as 1 here
    dense = layers * 6 * d * f
    moe = (layers - moe_layers) * 6 * d * f + moe_layers * (6 * d * f * k + 2 * d * config.moe.num_experts)
    return {"dense_ffn": dense, "moe_ffn": moe, "ratio": moe / dense, "moe_layers": moe_layers,
            "experts": config.moe.num_experts, "top_k": k}


def answer(gains: dict, interaction: dict, moe_vs_dense: dict) -> str:
    """One honest sentence per metric: is the MoE's instruction-tuning gain larger than dense's, beyond the CI?"""
    lines = []
    for metric, unit in (("loss", " nats"), ("exact_match", "")):
        inter = interaction[metric]
        if inter["ci95"] is None:
            verdict, ci = "undetermined (one seed, no interval)", ""
        else:
            lo, hi = inter["mean"] - inter["ci95"], inter["mean"] + inter["ci95"]
            verdict = ("larger for MoE" if lo > 0 else "larger for dense" if hi < 0 else
                       "not distinguishable (the 95% CI includes 0)")
            ci = f" ± {inter['ci95']:.4f}"
        lines.append(f"{metric}: instruction-tuning gain dense {gains[metric]['dense']['mean']:+.4f}, "
                     f"MoE {gains[metric]['moe']['mean']:+.4f}{unit}; MoE - dense gain {inter['mean']:+.4f}{ci} "
                     f"-> {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _progress():
    if os.environ.get("UPCYCLE_NO_PROGRESS"):
        return None
    from upcycle.progress import make_progress

    return make_progress()
