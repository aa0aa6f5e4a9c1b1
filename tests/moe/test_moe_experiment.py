"""The Flan-MoE experiment end to end on a micro config: cells, results, report, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import stdlib_code_dir

from upcycle.data.instructions import MixtureConfig
from upcycle.data.splits import SplitConfig
from upcycle.errors import UserError
from upcycle.moe.config import CONDITIONS, ExperimentConfig
from upcycle.moe.experiment import run_experiment
from upcycle.training.config import TrainConfig

MODULES = ["json/decoder.py", "textwrap.py", "heapq.py", "fractions.py", "shutil.py", "glob.py", "base64.py"]


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory) -> Path:
    return stdlib_code_dir(tmp_path_factory.mktemp("code"), MODULES)


def micro_config(base: Path, data: Path, seeds=(0,)) -> ExperimentConfig:
    return ExperimentConfig(
        base=str(base), seeds=list(seeds), block_size=128, eval_examples=4,
        mixture=MixtureConfig(data=str(data), max_function_chars=200, splits=SplitConfig(validation=0.1, test=0.3)),
        instruct=TrainConfig(steps=3, batch_size=2, warmup_steps=1, lr=1e-3, checkpoint_every=1),
        finetune=TrainConfig(steps=2, batch_size=2, warmup_steps=1, lr=1e-3))


def test_micro_experiment_end_to_end_and_resume(tmp_path, tiny_llama_dir, code_dir, one_torch_thread, monkeypatch):
    out = tmp_path / "run"
    config = micro_config(tiny_llama_dir, code_dir)
    results = run_experiment(out, config)

    cells = sorted(str(p.relative_to(out / "cells")) for p in (out / "cells").rglob("*.json"))
    expected = ["start/dense.json", "start/moe-s0.json", "instruct/dense-s0.json", "instruct/moe-s0.json",
                *[f"finetune/{a}-{c}-s0.json" for a in ("dense", "moe") for c in CONDITIONS]]
    assert cells == sorted(expected)
    assert set(results["conditions"]) == {f"{a}/{c}" for a in ("dense", "moe") for c in CONDITIONS}
    moe_cell = json.loads((out / "cells/finetune/moe-instruct-s0.json").read_text())
    dense_cell = json.loads((out / "cells/finetune/dense-instruct-s0.json").read_text())
    # Fine-tuning data are the held-out task types only; the scored examples are theirs too.
    assert set(moe_cell["eval"]["tasks"]) <= {"name_function", "return_value"}
    assert moe_cell["data"] == dense_cell["data"] and moe_cell["data"]["examples"] > 0
    # The MoE's per-step history carries routing statistics (plotted over training); dense has none.
    history = moe_cell["train"]["history"]
    assert len(history) == 2 and {"moe/dropped_fraction", "moe/utilisation_max", "lm_loss"} <= set(history[0])
    assert "moe/dropped_fraction" not in dense_cell["train"]["history"][0]
    assert 0 <= moe_cell["eval"]["routing"]["moe/dropped_fraction"] <= 1
    # Instruction tuning changed the starting point of the 'instruct' cells, not of the 'direct' ones.
    direct = json.loads((out / "cells/finetune/dense-direct-s0.json").read_text())
    assert direct["train"]["history"][0]["loss"] != dense_cell["train"]["history"][0]["loss"]
    assert results["flops"]["ratio"] == pytest.approx(1.0, abs=0.05)  # top-1 of full-size experts
    report = (out / "report.md").read_text()
    assert "| dense | fine-tuned only |" in report and "MoE gain - dense gain" in report
    for name in ("heldout.png", "routing.png", "training_loss.png", "results.json"):
        assert (out / name).stat().st_size > 0
    assert not (out / ".work").exists() or not any((out / ".work").rglob("train_state.pt"))

    # Rerun: every cell is finished, so nothing trains; the summary is the same.
    import upcycle.moe.instruct as instruct

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(instruct, "train_stage", refuse)
    again = run_experiment(out, config)
    assert again["conditions"] == results["conditions"]

    # A finished cell's file removed: only that cell runs again.
    (out / "cells/finetune/moe-direct-s0.json").unlink()
    trained = []
    monkeypatch.setattr(instruct, "train_stage", lambda *a, **k: trained.append(a[6]) or _fake_result())
    run_experiment(out, config)
    assert trained == ["finetune moe-direct s0"]

    # Other settings in the same directory are refused with one line.
    with pytest.raises(UserError, match="other settings") as info:
        run_experiment(out, micro_config(tiny_llama_dir, code_dir, seeds=(0, 1)))
    assert "\n" not in str(info.value)


def _fake_result():
    from upcycle.training.loop import TrainResult

    return TrainResult(steps=1, history=[{"step": 1, "loss": 1.0}])


@pytest.mark.parametrize("make, message", [
    (lambda: ExperimentConfig(seeds=[]), "at least one seed"),
    (lambda: ExperimentConfig(seeds=[1, 1]), "distinct"),
    (lambda: ExperimentConfig(mixture=MixtureConfig(held_out=[])), "held-out task types"),
    (lambda: ExperimentConfig(mixture=MixtureConfig(held_out=["summarise"])), "unknown task type"),
])
def test_bad_settings_are_one_line_user_errors(make, message):
    with pytest.raises(UserError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_block_size_beyond_the_base_is_a_user_error(tmp_path, tiny_llama_dir, code_dir):
    config = micro_config(tiny_llama_dir, code_dir)
    config.block_size = 512  # the tiny Llama has 256 positions
    with pytest.raises(UserError, match="exceeds the base's 256 positions"):
        run_experiment(tmp_path / "run", config)


def test_cli_bad_input_exits_with_one_line(tmp_path, capsys):
    from upcycle.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p"}) + "\n")
    assert main(["moe", "experiment", "--out", str(tmp_path / "run"), "--mixture.data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("upcycle: error:") and "no column 'response'" in err and "\n" not in err
