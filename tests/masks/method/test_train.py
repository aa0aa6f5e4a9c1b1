"""Mask training through the shared loop: reaching the target, resuming with the multipliers, bad settings."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import tiny_decoder
from upcycle.errors import UserError
from upcycle.masks.config import MaskConfig, MaskTrainConfig
from upcycle.masks.method.train import train_masks
from upcycle.training.config import TrainConfig


def tiny_config(steps: int, **overrides) -> MaskTrainConfig:
    train = TrainConfig(steps=steps, batch_size=4, lr=0.05, warmup_steps=5, min_lr_ratio=1.0,
                        **overrides.pop("train", {}))
    return MaskTrainConfig(**({"target": 0.5, "masks": MaskConfig(experts=4), "block_size": 16, "train": train,
                               "warmup_fraction": 0.4} | overrides))


def random_blocks(n: int = 32, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(0))
    return ids, ids.clone()


def test_training_reaches_target_and_trains_only_masks():
    model = tiny_decoder()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    result, lagrangian = train_masks(model, random_blocks(), tiny_config(steps=150))
    last = result.history[-1]
    assert {"lm_loss", "expected_active", "target", "penalty", "lambda1", "lambda2"} <= set(last)
    assert last["target"] == 0.5 and lagrangian.step == 150
    assert abs(last["expected_active"] - 0.5) < 0.03
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k in frozen)


def test_training_resumes_with_its_multipliers(tmp_path):
    config = tiny_config(steps=10, train={"checkpoint_every": 5})
    model = tiny_decoder()
    _, first = train_masks(model, random_blocks(), config, checkpoint_dir=tmp_path)
    assert (tmp_path / "lagrangian.json").exists()
    again = tiny_decoder()
    result, second = train_masks(again, random_blocks(), config, checkpoint_dir=tmp_path)
    assert second.step == 10 and second.lambda1 == pytest.approx(first.lambda1)
    assert len(result.history) == 10  # nothing re-run
    gates = [k for k in model.state_dict() if "gates" in k or "router" in k]
    assert all(torch.equal(model.state_dict()[k], again.state_dict()[k]) for k in gates)
    # the fixed routers come back from the run directory, not from a second k-means
    from safetensors.torch import load_file, save_file

    saved = load_file(tmp_path / "routers.safetensors")
    save_file({k: v + 1.0 for k, v in saved.items()}, tmp_path / "routers.safetensors")
    third = tiny_decoder()
    train_masks(third, random_blocks(), config, checkpoint_dir=tmp_path)
    assert all(torch.equal(third.state_dict()[k], v + 1.0) for k, v in saved.items())


def test_training_that_ends_off_target_says_so(caplog):
    model = tiny_decoder()
    config = tiny_config(steps=3, masks=MaskConfig(experts=4, layout="partition"))
    with caplog.at_level("WARNING", logger="upcycle.masks.method.train"):
        result, _ = train_masks(model, random_blocks(), config)
    assert result.history[-1]["expected_active"] > 0.55  # three steps: the gates have not moved
    assert "expected active for a 50% target" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="upcycle.masks.method.train"):
        train_masks(tiny_decoder(), random_blocks(), tiny_config(steps=150))
    assert "expected active" not in caplog.text


@pytest.mark.parametrize(("overrides", "message"), [
    ({"target": 0.0}, "--recipe.target"), ({"target": 1.2}, "--recipe.target"),
    ({"warmup_fraction": 1.5}, "--recipe.warmup_fraction"), ({"block_size": 1}, "--recipe.block_size"),
    ({"lambda_lr": 0.0}, "multipliers"), ({"distill": -0.1}, "--recipe.distill"),
    ({"distill": 1.5}, "--recipe.distill"),
])
def test_bad_training_settings(overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_config(steps=10, **overrides)


def test_distillation_trains_toward_the_dense_model():
    """distill = 1 reports the KL to the dense base, and the masked model (FFN weights trained too) ends closer to
    the dense base's distribution than the same run on the LM loss."""
    from upcycle.training.distill import kl_to_teacher

    blocks = random_blocks()
    dense = tiny_decoder()
    kls = {}
    for distill in (0.0, 1.0):
        model = tiny_decoder()
        result, _ = train_masks(model, blocks, tiny_config(steps=150, distill=distill, ffn_lr=0.01))
        assert ("kl_to_dense" in result.history[-1]) == bool(distill)
        assert abs(result.history[-1]["expected_active"] - 0.5) < 0.03
        model.eval()
        with torch.no_grad():
            kls[distill] = float(kl_to_teacher(model(input_ids=blocks[0]).logits, dense(input_ids=blocks[0]).logits,
                                               blocks[1]))
    assert kls[1.0] < kls[0.0]


def test_distillation_needs_an_unmasked_model():
    from upcycle.masks.method.train import prepare_masked_model

    model = tiny_decoder()
    prepare_masked_model(model, tiny_config(steps=5), random_blocks()[0])
    with pytest.raises(ValueError, match="dense base"):
        train_masks(model, random_blocks(), tiny_config(steps=5, distill=0.5))
