"""Mask training: learn the experts' hard-concrete gates and the token routers on a frozen base, through the shared
training loop, with the Lagrangian steering the expected active ratio to the target.

The loss is the LM loss (or, with `distill`, its mix with the KL divergence to the dense base) plus the Lagrangian
penalty, each returned as a metric every step; the multipliers ascend in the loop's `after_step` hook. Only the
gates' log α train (and the routers, and the FFN weights, when asked); everything else stays frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from upcycle.io import read_json, write_json
from upcycle.masks.config import MaskTrainConfig
from upcycle.masks.method.active import collect_expected_active
from upcycle.masks.method.cluster_init import apply_cluster_starts, cluster_starts
from upcycle.masks.method.lagrangian import Lagrangian
from upcycle.masks.method.surgery import (
    add_masks,
    ffn_parameters,
    mask_parameters,
    mask_state_dict,
    masked_ffns,
)
from upcycle.training.distill import frozen_teacher, kl_to_teacher
from upcycle.training.loop import TrainResult, is_main_process, train

log = logging.getLogger(__name__)

OFF_TARGET = 0.05
"""How far from the target the expected active ratio may end before training warns. Under Adam a gate's log α moves
by at most about the learning rate per step, so at the default 0.1 a gate that starts open (log α 2.5-4.5) needs
50-70 steps to close: SmolLM2's 48-step run (docs/masks.md) ended at 59.7 % for a 50 % target, where it started."""

LAGRANGIAN_STATE = "lagrangian.json"
ROUTERS_STATE = "routers.safetensors"
"""Fixed routers of a resumable run: the loop's checkpoint holds only what trains, and a resumed run must route
exactly as before rather than trust k-means to come out bit-identical a second time."""


def prepare_masked_model(model: nn.Module, config: MaskTrainConfig, train_inputs: torch.Tensor | None = None
                         ) -> list[nn.Parameter] | list[dict]:
    """Add mask experts to `model` (unless it has them), started as `config.masks.init` says (the 'clusters' init
    reads `train_inputs` [N, L]), and freeze everything else. Returns the trainable parameters: with
    `config.ffn_lr`, two optimizer groups, the masks' and the FFN weights' (at ffn_lr)."""
    if not masked_ffns(model):
        starts = None
        if config.masks.init == "clusters":
            if train_inputs is None:
                raise ValueError("the 'clusters' init needs training blocks")
            starts = cluster_starts(model, train_inputs, config.masks.experts, config.cluster_tokens,
                                    seed=config.train.seed)
        add_masks(model, config.masks, seed=config.train.seed)
        if starts is not None:
            apply_cluster_starts(model, starts, config.masks.rank_spread,
                                 min(1.0, config.target + config.masks.partition_slack))
    for param in model.parameters():
        param.requires_grad_(False)
    params = mask_parameters(model, routers=config.train_routers)
    ffn = ffn_parameters(model) if config.ffn_lr is not None else []
    for param in params + ffn:
        param.requires_grad_(True)
    if not ffn:
        return params
    return [{"params": params}, {"params": ffn, "lr_scale": config.ffn_lr / config.train.lr}]


def train_masks(model: nn.Module, train_blocks: tuple[torch.Tensor, torch.Tensor], config: MaskTrainConfig,
                eval_blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
                checkpoint_dir: str | Path | None = None, progress=None) -> tuple[TrainResult, Lagrangian]:
    """Train masks and routers on `model` (masked here if it is not yet) with the LM loss + Lagrangian penalty.

    Resumable: with `checkpoint_dir`, the loop's checkpoint and the multipliers (`lagrangian.json`) are saved every
    `train.checkpoint_every` steps and picked up again by the same call. With `config.distill` the model must come
    unmasked: its dense copy is the teacher.
    """
    teacher = None
    if config.distill:
        if masked_ffns(model):
            raise ValueError("distillation needs the dense base as its teacher: pass the model before masks are added")
        teacher = frozen_teacher(model)
    params = prepare_masked_model(model, config, train_blocks[0])
    if checkpoint_dir is not None and not config.train_routers:
        _keep_routers(model, Path(checkpoint_dir) / ROUTERS_STATE)
    lagrangian = Lagrangian(config.lagrangian())
    state_path = Path(checkpoint_dir) / LAGRANGIAN_STATE if checkpoint_dir else None
    if state_path is not None and state_path.exists():
        lagrangian.load_state_dict(read_json(state_path))

    def loss_fn(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        with collect_expected_active(model) as collected:
            output = model(input_ids=inputs, labels=labels)
        loss, metrics = output.loss, {"lm_loss": float(output.loss.detach())}
        if teacher is not None:
            if next(teacher.parameters()).device != inputs.device:  # the loop may have moved the student
                teacher.to(inputs.device)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=inputs).logits
            kl = kl_to_teacher(output.logits, teacher_logits, labels)
            loss = (1.0 - config.distill) * loss + config.distill * kl
            metrics["kl_to_dense"] = float(kl.detach())
        penalty, lagrangian_metrics = lagrangian.penalty(collected.ratio())
        return loss + penalty, {**metrics, **lagrangian_metrics}

    def after_step(step: int, record: dict[str, float]) -> None:
        lagrangian.ascend(record["expected_active"])
        every = config.train.checkpoint_every
        if state_path is not None and every and step % every == 0 and is_main_process():  # ranks agree: one writes
            write_json(state_path, lagrangian.state_dict())

    result = train(model, train_blocks, config.train, eval_blocks=eval_blocks, loss_fn=loss_fn, parameters=params,
                   after_step=after_step, checkpoint_dir=checkpoint_dir, description="masks", progress=progress)
    last = result.history[-1]
    log.info("masks: expected active %.3f (target %.3f), LM loss %.3f", last["expected_active"], config.target,
             last["lm_loss"])
    if abs(last["expected_active"] - config.target) > OFF_TARGET:
        log.warning("masks: training ended at %.1f%% expected active for a %.0f%% target: the gate calibration will "
                    "close or open the difference by the gates' ranking alone; more steps (--recipe.train.steps) "
                    "let the gates learn it", 100 * last["expected_active"], 100 * config.target)
    return result, lagrangian


def _keep_routers(model: nn.Module, path: Path) -> None:
    """Load the routers saved at `path` by an earlier start of this run, or save them there (rank 0)."""
    from safetensors.torch import load_file, save

    from upcycle.io import atomic_write_bytes

    if path.exists():
        model.load_state_dict(load_file(path), strict=False)
    elif is_main_process():
        routers = {k: v.contiguous() for k, v in mask_state_dict(model).items() if ".router." in k}
        atomic_write_bytes(path, save(routers))
