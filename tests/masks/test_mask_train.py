"""Mask training through the shared loop, the run directory, and the CLI functions' one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mask_helpers import corpus_dir, small_recipe, tiny_decoder

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


@pytest.mark.parametrize(("overrides", "message"), [
    ({"target": 0.0}, "--recipe.target"), ({"target": 1.2}, "--recipe.target"),
    ({"warmup_fraction": 1.5}, "--recipe.warmup_fraction"), ({"block_size": 1}, "--recipe.block_size"),
    ({"lambda_lr": 0.0}, "multipliers"),
])
def test_bad_training_settings(overrides, message):
    with pytest.raises(UserError, match=message):
        tiny_config(steps=10, **overrides)


# ---- the CLI functions, end to end on a tiny saved base ------------------------------------------------------------

def test_train_analyze_and_refuse_another_base(tmp_path, tiny_llama_dir, tiny_tokenizer, capsys):
    from tests.conftest import save_tiny_llama
    from upcycle.data.splits import SplitConfig
    from upcycle.io import read_json
    from upcycle.masks import commands
    from upcycle.masks.method.export import load_compact

    run = tmp_path / "run"
    splits = SplitConfig(validation=0.3, test=0.0)
    commands.train(str(tiny_llama_dir), out=str(run), data=str(corpus_dir(tmp_path)), eval_blocks=4,
                   recipe=small_recipe(steps=12), splits=splits)
    assert "of FFN neurons active per token" in capsys.readouterr().out
    meta = read_json(run / "masks.json")
    assert meta["base"]["path"] == str(Path(tiny_llama_dir).resolve())
    assert 0 < meta["evaluation"]["achieved_active_ratio"] <= 1
    assert meta["compact"]["max_abs_logit_difference"] < 1e-4
    assert set(read_json(run / "analysis.json")["experts"]) == {"shared", "token-specific", "inactive"}
    compact = load_compact(run / "compact")
    assert compact(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tiny_tokenizer))

    commands.analyze(str(run), eval_blocks=2)
    assert "active over" in capsys.readouterr().out
    assert "| model.layers.1.mlp |" in (run / "analysis.md").read_text()
    assert (run / "experts.png").stat().st_size > 0
    assert set(read_json(run / "masks.json")["evaluation"]["layer_active_ratios"]) == {"model.layers.0.mlp",
                                                                                      "model.layers.1.mlp"}
    other = save_tiny_llama(tmp_path / "other", tiny_tokenizer, seed=1)
    with pytest.raises(UserError, match="were trained on"):
        commands.analyze(str(run), base=str(other))


def test_oversized_compact_export_is_skipped_with_a_reason(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from upcycle.data.splits import SplitConfig
    from upcycle.io import read_json
    from upcycle.masks import commands
    from upcycle.masks.experiments import end_to_end

    monkeypatch.setattr(end_to_end, "SKIP_COMPACT_ABOVE", (0.5, 0))  # this tiny export counts as "too large"
    run = tmp_path / "run"
    commands.train(str(tiny_llama_dir), out=str(run), data=str(corpus_dir(tmp_path)), eval_blocks=2,
                   recipe=small_recipe(steps=4), splits=SplitConfig(validation=0.3, test=0.0))
    assert "compact export skipped" in capsys.readouterr().out
    compact = read_json(run / "masks.json")["compact"]
    assert "use fewer --recipe.masks.experts" in compact["skipped"] and compact["packed_rows_ratio"] > 0.5
    assert not (run / "compact").exists() and (run / "masks.safetensors").is_file()


def test_cli_refuses_bad_targets_experts_and_bases(tmp_path, tiny_llama_dir, capsys):
    from upcycle.cli import main
    from upcycle.masks import commands

    for argv, flag in [(["train", "--recipe.target", "1.5"], "--recipe.target"),
                       (["train", "--recipe.masks.experts", "0"], "--recipe.masks.experts"),
                       (["sweep", "--targets", "[0.5, 0.0]"], "--recipe.target")]:
        assert main(["masks", *argv, "--base", str(tiny_llama_dir), "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("upcycle: error: ") and flag in err and "\n" not in err, err
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="not a mask run"):
        commands.analyze(str(tmp_path))
