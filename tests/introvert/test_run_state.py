"""The run directory under misuse: settings that cannot train, foreign directories, locks, interruptions, reruns."""

from __future__ import annotations

import pytest

from upcycle.errors import UserError
from upcycle.introvert.experts import ExpertConfig


@pytest.mark.parametrize(("field", "value"), [("tokens_per_expert", 0), ("tokens_per_expert", -5), ("batch_size", 0),
                                              ("block_size", 0), ("block_size", 1), ("lr", 0.0),
                                              ("warmup_steps", -1)])
def test_expert_settings_that_cannot_train_are_refused(field, value):
    with pytest.raises(UserError, match=f"--expert.{field} must be"):
        ExpertConfig(**{field: value})
