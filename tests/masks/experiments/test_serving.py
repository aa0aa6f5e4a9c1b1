"""An exported mask model served through the engine and generated from the CLI: the same tokens as HF `generate`."""

from __future__ import annotations

import pytest
import torch

from upcycle.errors import UserError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    """A partition-masked tiny Llama (clusters init, untrained), compacted and saved as `masks export` writes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.masks.config import MaskConfig, MaskTrainConfig
    from upcycle.masks.method.compact import compact_model
    from upcycle.masks.method.export import save_compact
    from upcycle.masks.method.train import prepare_masked_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    blocks = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    config = MaskTrainConfig(target=0.5, masks=MaskConfig(experts=4, layout="partition"), cluster_tokens=256)
    prepare_masked_model(model, config, blocks)
    compact_model(model.eval())
    out = tmp_path_factory.mktemp("compact") / "model"
    save_compact(model, out, AutoTokenizer.from_pretrained(tiny_llama_dir), extra={"target": 0.5})
    return out


def test_the_engine_serves_it_with_the_tokens_of_hf_generate(exported):
    from upcycle.masks.method.export import load_compact
    from upcycle.serving.config import EngineConfig
    from upcycle.serving.engine import Engine
    from upcycle.serving.sampling import SamplingParams
    from upcycle.serving.source import open_source

    served = open_source(exported, spec="masks")
    assert served.experts == {} and served.router is None
    engine = Engine.from_pretrained(served.base, served.experts, EngineConfig(max_batch=2), served.loader).start()
    try:
        prompt = [5, 17, 42, 9, 3]
        completion = engine.generate(prompt, params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    finally:
        engine.close()
    reference = load_compact(exported).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                                min_new_tokens=12)
    assert completion.token_ids == reference[0, len(prompt):].tolist()


def test_masks_generate_prints_text_and_speed(exported, capsys):
    from upcycle.masks import commands

    commands.generate(str(exported), "def f(x):", max_new_tokens=4)
    out = capsys.readouterr().out
    assert out.startswith("def f(x):") and "tokens/s]" in out


def test_a_directory_that_is_not_an_exported_mask_model_is_refused(tiny_llama_dir):
    from upcycle.serving.source import open_source

    with pytest.raises(UserError, match="is not an exported mask model"):
        open_source(tiny_llama_dir, spec="masks")
