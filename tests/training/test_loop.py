import pytest
import torch

from upcycle.errors import UserError
from upcycle.training.config import TrainConfig
from upcycle.training.loop import lr_at, train


def _blocks(tokenizer, n=24, length=32):
    from tests.conftest import small_corpus_texts
    from upcycle.data.packing import pack, tokenize

    inputs, labels = pack(tokenize(tokenizer, small_corpus_texts()[:3]), length, tokenizer.pad_token_id)
    return inputs[:n], labels[:n]


def _model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


def test_training_lowers_the_loss(tiny_llama_dir, tiny_tokenizer):
    model = _model(tiny_llama_dir)
    blocks = _blocks(tiny_tokenizer)
    result = train(model, blocks, TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=2), eval_blocks=blocks)
    first = sum(r["loss"] for r in result.history[:3]) / 3
    last = sum(r["loss"] for r in result.history[-3:]) / 3
    assert last < first - 0.5
    assert result.tokens == 30 * 8 * 32 and result.evals[-1]["step"] == 30


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_llama_dir, tiny_tokenizer):
    blocks = _blocks(tiny_tokenizer)
    config = TrainConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, checkpoint_every=2)
    straight = _model(tiny_llama_dir)
    train(straight, blocks, config)

    class Stop(Exception):
        pass

    def stop_at_4(step, record):
        if step == 4:
            raise Stop

    resumed = _model(tiny_llama_dir)
    with pytest.raises(Stop):
        train(resumed, blocks, config, checkpoint_dir=tmp_path, after_step=stop_at_4)
    resumed = _model(tiny_llama_dir)  # a fresh process would start from the base weights again
    result = train(resumed, blocks, config, checkpoint_dir=tmp_path)
    assert result.steps == 6 and len(result.history) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_schedule_warms_up_then_decays():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(99, config) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 99))


def test_bad_settings_and_empty_data_are_user_errors(tiny_llama_dir):
    with pytest.raises(UserError):
        TrainConfig(steps=0)
    with pytest.raises(UserError, match="no training blocks"):
        train(_model(tiny_llama_dir), (torch.zeros(0, 8, dtype=torch.long),) * 2, TrainConfig(steps=1))


def test_corrupt_checkpoint_says_what_to_do(tmp_path, tiny_llama_dir, tiny_tokenizer):
    (tmp_path / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="delete it"):
        train(_model(tiny_llama_dir), _blocks(tiny_tokenizer), TrainConfig(steps=1), checkpoint_dir=tmp_path)


def test_parameter_groups_scale_the_schedule(tiny_llama_dir, tiny_tokenizer):
    blocks = _blocks(tiny_tokenizer, n=8)
    config = TrainConfig(steps=3, batch_size=4, lr=5e-3, warmup_steps=1)
    plain, grouped, frozen = (_model(tiny_llama_dir) for _ in range(3))
    train(plain, blocks, config, parameters=list(plain.parameters()))
    train(grouped, blocks, config, parameters=[{"params": list(grouped.parameters()), "lr_scale": 1.0}])
    for (name, a), b in zip(plain.state_dict().items(), grouped.state_dict().values()):
        assert torch.equal(a, b), name
    embeddings = frozen.get_input_embeddings().weight
    before = embeddings.detach().clone()
    rest = [p for p in frozen.parameters() if p is not embeddings]
    train(frozen, blocks, config, parameters=[{"params": rest}, {"params": [embeddings], "lr_scale": 0.0}])
    assert torch.equal(embeddings.detach(), before)
    assert not torch.equal(frozen.model.norm.weight, _model(tiny_llama_dir).model.norm.weight)
