"""One mask run end to end on a tiny saved base, through the CLI functions: train, analyse, refuse another base,
skip an oversized compact export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.masks.mask_helpers import corpus_dir, small_recipe
from upcycle.errors import UserError


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
    assert "--recipe.masks.layout partition" in compact["skipped"] and compact["packed_rows_ratio"] > 0.5
    assert not (run / "compact").exists() and (run / "masks.safetensors").is_file()


def test_export_writes_the_partitioned_fast_model_and_refuses_what_it_cannot_export(tmp_path, tiny_llama_dir,
                                                                                      capsys):
    from dataclasses import replace

    from upcycle.data.splits import SplitConfig
    from upcycle.io import read_json
    from upcycle.masks import commands
    from upcycle.masks.method.export import load_compact

    data, splits = str(corpus_dir(tmp_path)), SplitConfig(validation=0.3, test=0.0)
    with pytest.raises(UserError, match="is not a mask run"):
        commands.export(str(tmp_path / "nothing"))
    interrupted = tmp_path / "interrupted"
    (interrupted / ".work").mkdir(parents=True)
    with pytest.raises(UserError, match="still training or was interrupted"):
        commands.export(str(interrupted))

    run = tmp_path / "partition"
    recipe = small_recipe(steps=6)
    recipe = replace(recipe, masks=replace(recipe.masks, experts=4, layout="partition"))
    commands.train(str(tiny_llama_dir), out=str(run), data=data, eval_blocks=2, recipe=recipe, splits=splits,
                   compact=False)
    commands.export(str(run), out=str(tmp_path / "fast"))
    assert "the dense FFN rows" in capsys.readouterr().out
    entry = read_json(run / "masks.json")["compact"]
    assert entry["packed_rows_ratio"] <= 1.0 and entry["max_abs_logit_difference"] < 1e-4
    model = load_compact(tmp_path / "fast")
    for _, layer in model.named_modules():
        if hasattr(layer, "ffn") and hasattr(layer.ffn, "overlap"):  # disjoint blocks: no gathers
            assert torch.equal(layer.ffn.overlap, torch.diag(layer.ffn.overlap.diagonal()))

    overlap = tmp_path / "overlap"
    commands.train(str(tiny_llama_dir), out=str(overlap), data=data, eval_blocks=2, recipe=small_recipe(steps=4),
                   splits=splits, compact=False)
    with pytest.raises(UserError, match=r"above the cap of 1.25x .*layout partition"):
        commands.export(str(overlap))
