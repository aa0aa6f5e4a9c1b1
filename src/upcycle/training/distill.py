"""Distillation from a frozen dense teacher: the recovery loss of pruned models (Sheared-LLaMA, Minitron).

The teacher's whole next-token distribution carries more signal per training token than the one-hot label, which
matters when a sparsified model must recover on a small token budget.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.data.packing import IGNORE_INDEX


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with no trainable parameters (take it before any surgery on `model`)."""
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over scored positions of KL(teacher ‖ student) between next-token distributions.

    Logits are [B, L, V] as Hugging Face returns them; labels [B, L] as passed to the model (so position t predicts
    labels[t + 1], the same shift HF's loss applies). Positions whose target is IGNORE_INDEX are not scored; the
    softmaxes are taken in float32.
    """
    scored = labels[:, 1:] != IGNORE_INDEX  # [B, L-1]
    student = F.log_softmax(student_logits[:, :-1][scored].float(), dim=-1)  # [P, V]
    teacher = F.log_softmax(teacher_logits[:, :-1][scored].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")
