"""The CLI functions end to end on the tiny Llama: upcycle, train a few steps, export to Mixtral, inspect."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle.data.corpus import stdlib_root
from upcycle.moe.commands import moe_export_mixtral, moe_inspect, moe_train, moe_upcycle
from upcycle.moe.config import MoEConfig
from upcycle.moe.train import real_token_mask
from upcycle.training.config import TrainConfig


def test_real_token_mask_keeps_prompts_and_drops_trailing_padding():
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [1, 2, 3, 4, 5, 6]])
    assert real_token_mask(labels).tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


def test_upcycle_train_export_inspect(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "corpus"
    data.mkdir()
    for i, name in enumerate(["heapq.py", "bisect.py", "textwrap.py", "fractions.py"]):
        (data / f"{i}.py").write_text((stdlib_root() / name).read_text(encoding="utf-8"))

    upcycled = moe_upcycle(str(tiny_llama_dir), out=str(tmp_path / "moe"),
                           moe=MoEConfig(num_experts=4, router="st_moe"))
    line = capsys.readouterr().out
    assert float(line.rsplit("=", 1)[1]) <= 1e-5  # the step-0 drift it reports

    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1)
    trained = moe_train(str(upcycled), out=str(tmp_path / "trained"), data=str(data), block_size=32, train=config)
    summary = json.loads((trained / "train.json").read_text())
    history = summary["result"]["history"]
    assert len(history) == 3
    assert {"lm_loss", "aux_loss", "moe/balance_loss", "moe/z_loss", "moe/entropy", "moe/dropped_fraction"} <= set(
        history[0])
    assert history[0]["loss"] == pytest.approx(history[0]["lm_loss"] + history[0]["aux_loss"], rel=1e-5)

    mixtral = moe_export_mixtral(str(trained), out=str(tmp_path / "mixtral"))
    assert AutoModelForCausalLM.from_pretrained(mixtral).config.num_local_experts == 4

    report = moe_inspect(str(trained), data=str(data), blocks=2, block_size=32, split="train")
    assert set(report) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert sum(report["model.layers.0.mlp"]["tokens_per_expert"]) == 2 * report["model.layers.0.mlp"]["tokens"]
