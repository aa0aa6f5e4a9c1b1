"""The project's one training loop: random packed blocks, AdamW, warm-up + cosine schedule, resumable.

Every method trains through `train`: pretraining the tiny base, LoRA experts, the MoE and the mask models. What
differs between them is the `loss_fn` (auxiliary losses are returned from it, never stashed in globals) and, for
the masks' Lagrangian, an optional `after_step` hook. The loop runs under `accelerate launch` / torchrun unchanged:
the Accelerator wraps model and optimizer, and each process draws its own blocks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from upcycle.errors import UserError
from upcycle.eval.perplexity import mean_loss
from upcycle.training.config import TrainConfig

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainResult:
    """What a run did: per-step losses, evaluations and throughput."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def causal_lm_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Plain next-token cross-entropy through the Hugging Face `labels` argument."""
    loss = model(input_ids=inputs, labels=labels).loss
    return loss, {}


def is_main_process() -> bool:
    """True on the one process that writes a run's files: rank 0 under torchrun / `accelerate launch`, and any
    process started on its own (local process and Ray executors run independent jobs, each its own rank 0)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate after `step` optimizer steps: linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def train(
    model: nn.Module,
    train_blocks: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    *,
    eval_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: LossFn = causal_lm_loss,
    parameters: list[nn.Parameter] | list[dict] | None = None,
    after_step: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    description: str = "train",
    progress=None,
) -> TrainResult:
    """Train `model` on random blocks of `train_blocks` = (inputs [N, L], labels [N, L]) for `config.steps` steps.

    Only `parameters` (default: those with requires_grad) are optimised; they may be optimizer groups
    `{"params": [...], "lr_scale": s}`, whose learning rate is the schedule's times s. With `checkpoint_dir`, the run
    saves resumable state every `config.checkpoint_every` steps and resumes from it when started again. `progress` is a
    rich Progress to add a task to (one is made when None and the output is a terminal).
    """
    from accelerate import Accelerator

    inputs, labels = train_blocks
    if inputs.shape[0] == 0:
        raise UserError(f"{description}: no training blocks (the data is empty or shorter than one block)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params, optimizer = _optimizer(model, parameters, config, description)
    model, optimizer = accelerator.prepare(model, optimizer)
    state_path = Path(checkpoint_dir) / "train_state.pt" if checkpoint_dir else None
    start_step, result = _resume(state_path, accelerator, model, optimizer, description)
    generator = _block_sampler(config, accelerator.process_index, inputs.shape[0], start_step)

    model.train()
    started = time.perf_counter() - result.seconds
    with _progress_task(progress, description, config.steps, start_step, accelerator.is_main_process) as report:
        for step in range(start_step, config.steps):
            index = torch.randint(0, inputs.shape[0], (config.batch_size,), generator=generator)
            batch = (inputs[index].to(accelerator.device), labels[index].to(accelerator.device))
            record = _optimizer_step(model, optimizer, accelerator, params, loss_fn, batch, step, config)
            result.history.append(record)
            result.steps = step + 1
            result.tokens += int((batch[1] != -100).sum()) * accelerator.num_processes
            if after_step is not None:
                after_step(step + 1, record)
            if eval_blocks is not None and _every(step + 1, config.eval_every):
                result.evals.append(_evaluate(model, eval_blocks, config, step + 1))
                model.train()
            report(f"{description} loss {record['loss']:.3f}")
            if state_path is not None and _every(step + 1, config.checkpoint_every):
                result.seconds = time.perf_counter() - started
                if accelerator.is_main_process:
                    _save_state(state_path, accelerator.unwrap_model(model), optimizer, step + 1, result)
    result.seconds = time.perf_counter() - started
    if eval_blocks is not None and (not result.evals or result.evals[-1]["step"] != result.steps):
        result.evals.append(_evaluate(model, eval_blocks, config, result.steps))
    model.eval()
    return result


def _optimizer(model: nn.Module, parameters: list[nn.Parameter] | list[dict] | None, config: TrainConfig,
               description: str) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """AdamW over `parameters` (tensors or groups), or over every parameter that requires grad; refuses a model with
    nothing to train. Returns the flat list of parameters too (what gradient clipping sees)."""
    groups = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    params = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else list(groups)
    if not params:
        raise UserError(f"{description}: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    return params, optimizer


def _resume(state_path: Path | None, accelerator, model: nn.Module, optimizer,
            description: str) -> tuple[int, TrainResult]:
    """(first step, result so far): step 0 and an empty result, unless a saved state exists to continue from."""
    if state_path is None or not state_path.exists():
        return 0, TrainResult()
    start_step, result = _load_state(state_path, accelerator.unwrap_model(model), optimizer)
    log.info("%s: resuming at step %d", description, start_step)
    return start_step, result


def _block_sampler(config: TrainConfig, process_index: int, n_blocks: int, start_step: int) -> torch.Generator:
    """The generator that draws each step's block indices, seeded per process so that ranks see different blocks.

    It replays the draws of the steps already done, so a resumed run sees the same blocks as an unbroken one.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + process_index)
    for _ in range(start_step):
        torch.randint(0, n_blocks, (config.batch_size,), generator=generator)
    return generator


def _optimizer_step(model: nn.Module, optimizer, accelerator, params: list[nn.Parameter], loss_fn: LossFn,
                    batch: tuple[torch.Tensor, torch.Tensor], step: int, config: TrainConfig) -> dict[str, float]:
    """One scheduled AdamW step on `batch`; returns the step's record (step, lr, loss and `loss_fn`'s metrics)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, config) * group.get("lr_scale", 1.0)
    loss, metrics = loss_fn(model, *batch)
    accelerator.backward(loss)
    if config.grad_clip:
        accelerator.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    measured = _mean_over_processes(accelerator, {"loss": float(loss.detach()), **metrics})
    return {"step": step + 1, "lr": lr_at(step, config), **measured}


def _every(step: int, interval: int) -> bool:
    """True when `step` (1-based) ends an interval; an interval of 0 means never."""
    return bool(interval) and step % interval == 0


@contextmanager
def _progress_task(progress, description: str, total: int, completed: int, enabled: bool):
    """Yields `report(text)`, which advances one step on `progress` (a rich Progress, or a new one when None and this
    is the main process on a terminal). A Progress made here is started and stopped here; a caller's is left alone."""
    own_progress = progress is None
    progress = progress if progress is not None else _make_progress(enabled)
    if progress is None:
        yield lambda text: None
        return
    task = progress.add_task(description, total=total, completed=completed)

    def report(text: str) -> None:
        progress.update(task, advance=1, description=text)

    if own_progress:
        progress.start()
    try:
        yield report
    finally:
        if own_progress:
            progress.stop()


def _mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes (one all-reduce), so the history and `after_step` see the whole
    step's batch on every rank; a hook that updates state from them (the masks' multipliers) stays in sync."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(metrics, accelerator.reduce(values, reduction="mean").tolist()))


def _evaluate(model, eval_blocks, config: TrainConfig, step: int) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    inputs, labels = (t[: config.eval_blocks].to(device) for t in eval_blocks)
    loss = mean_loss(model, inputs, labels)
    return {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _make_progress(enabled: bool):
    if not enabled or os.environ.get("UPCYCLE_NO_PROGRESS"):
        return None
    from upcycle.progress import make_progress

    return make_progress()


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable or not trainable}


def _save_state(path: Path, model: nn.Module, optimizer, step: int, result: TrainResult) -> None:
    import io

    from upcycle.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save({"step": step, "model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                "result": asdict(result)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _load_state(path: Path, model: nn.Module, optimizer) -> tuple[int, TrainResult]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        raise UserError(f"{path} is corrupt; delete it to restart this training run from scratch") from None
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], TrainResult(**state["result"])
