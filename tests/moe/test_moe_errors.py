"""Bad input gives a one-line UserError saying what to fix."""

from __future__ import annotations

import pytest

from upcycle.errors import UserError
from upcycle.moe.config import MoEConfig, UpcycleConfig


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(num_experts=4, top_k=5), "top_k must be between 1 and num_experts=4"),
    (dict(num_experts=0), "num_experts must be >= 1"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor must be > 0"),
    (dict(router="top3"), "unknown router 'top3'"),
    (dict(dispatch="sparse"), "unknown dispatch 'sparse'"),
    (dict(router="switch", second_expert_policy="random"), "needs a router with top_k >= 2"),
    (dict(jitter_noise=1.5), "jitter_noise must be in"),
    (dict(grouped_backend="cuda"), "unknown grouped_backend"),
])
def test_bad_moe_config(kwargs, match):
    with pytest.raises(UserError, match=match) as error:
        MoEConfig(**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("kwargs", "match"), [(dict(every=0), "every must be >= 1"), (dict(noise=-1), "noise")])
def test_bad_upcycle_config(kwargs, match):
    with pytest.raises(UserError, match=match):
        UpcycleConfig(**kwargs)


def test_unknown_keys_in_a_saved_config():
    with pytest.raises(UserError, match="unknown MoE config keys"):
        MoEConfig.from_dict({"num_experts": 2, "experts_per_token": 1})


def test_aliases_resolve():
    assert MoEConfig(router="top1").router == "switch" and MoEConfig(router="top2").top_k == 2
    assert MoEConfig(router="st_moe").z_loss_coef == 1e-3 and MoEConfig(router="gshard").z_loss_coef == 0.0
    assert MoEConfig(router="switch").normalize_gates is True
