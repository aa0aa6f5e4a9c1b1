import json

import pytest

from tests.conftest import small_corpus_texts
from upcycle.io import sha256_file
from upcycle.models.config import PretrainConfig, TinyLlamaShape
from upcycle.models.pretrain import pretrain
from upcycle.training.config import TrainConfig


def test_recipe_runs_a_few_steps_and_saves_a_loadable_hf_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(small_corpus_texts() * 3):  # 30 documents: enough for every split
        (corpus / f"doc{i}.py").write_text(f"# copy {i}\n{text}")
    config = PretrainConfig(data=str(corpus), shape=TinyLlamaShape(vocab_size=300, hidden_size=32,
                                                                   intermediate_size=64, num_hidden_layers=1,
                                                                   num_attention_heads=2),
                            block_size=64, train=TrainConfig(steps=4, batch_size=2, eval_every=2, eval_blocks=4,
                                                             checkpoint_every=2))
    summary = pretrain(config, tmp_path / "base")
    out = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size
    recorded = json.loads((out / "pretrain.json").read_text())
    assert recorded["weights_sha256"] == sha256_file(out / "model.safetensors") == summary["weights_sha256"]
    assert [e["step"] for e in recorded["eval_curve"]] == [2, 4]
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_shipped_base_matches_its_recorded_recipe():
    from upcycle.models.base import default_base_dir

    path = default_base_dir()
    if not (path / "pretrain.json").exists():
        pytest.skip("shipped base not built")
    recorded = json.loads((path / "pretrain.json").read_text())
    assert recorded["weights_sha256"] == sha256_file(path / "model.safetensors")
    assert recorded["config"]["train"]["seed"] == 0 and recorded["validation_perplexity"] < 30
    curve = [e["loss"] for e in recorded["eval_curve"]]
    # close to convergence: the last quarter of the held-out curve is nearly flat
    assert curve[-len(curve) // 4] - curve[-1] < 0.1
