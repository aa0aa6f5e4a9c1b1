"""The distillation loss against a plain per-position loop, and the teacher copy."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.masks.mask_helpers import tiny_decoder
from upcycle.data.packing import IGNORE_INDEX
from upcycle.training.distill import frozen_teacher, kl_to_teacher


def loop_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> float:
    """Σ_v p_t(v) (log p_t(v) − log p_s(v)) at each scored position, averaged: the definition, position by position."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == IGNORE_INDEX:
                continue
            p_teacher = torch.softmax(teacher[b, t].double(), dim=0)
            p_student = torch.softmax(student[b, t].double(), dim=0)
            total += float((p_teacher * (p_teacher.log() - p_student.log())).sum())
            count += 1
    return total / count


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(2, 6), vocab=st.integers(2, 9), seed=st.integers(0, 10_000),
       ignored=st.floats(0.0, 0.6))
def test_kl_matches_the_definition_and_skips_ignored_targets(batch, length, vocab, seed, ignored):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g) * 3
    teacher = torch.randn(batch, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < ignored] = IGNORE_INDEX
    labels[0, 1] = 0  # at least one scored position
    assert math.isclose(float(kl_to_teacher(student, teacher, labels)), loop_kl(student, teacher, labels),
                        rel_tol=1e-4, abs_tol=1e-6)


def test_kl_is_zero_against_itself_and_positive_otherwise():
    logits = torch.randn(2, 5, 7)
    labels = torch.zeros(2, 5, dtype=torch.long)
    assert float(kl_to_teacher(logits, logits, labels)) < 1e-6
    assert float(kl_to_teacher(logits, logits.flip(-1), labels)) > 0


def test_teacher_is_a_frozen_copy():
    model = tiny_decoder()
    teacher = frozen_teacher(model)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training the student leaves the teacher as it was
    ids = torch.randint(0, 97, (1, 8))
    assert not torch.allclose(model(input_ids=ids).logits, teacher(input_ids=ids).logits)
