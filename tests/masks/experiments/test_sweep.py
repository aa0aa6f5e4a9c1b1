"""The sweep against the baselines: TEAL's decode path, measured active fractions, side-by-side timing, the report."""

from __future__ import annotations

import pytest
import torch

from tests.masks.mask_helpers import corpus_dir, shape_gates, small_recipe, tiny_decoder
from upcycle.errors import UserError
from upcycle.masks.baselines.teal import ThresholdFFN, sparsify_activations
from upcycle.masks.config import BaselineSettings, MaskConfig
from upcycle.masks.experiments.latency import measure_latency, round_robin
from upcycle.masks.experiments.sweep import merge_sweeps, write_sweep
from upcycle.masks.method.analysis import analyze_masks
from upcycle.masks.method.compact import compact_layers, compact_model
from upcycle.masks.method.surgery import add_masks, masked_ffns
from upcycle.ops.reference_ffn import reference_masked_ffn

TOKENS = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("keep", [1.0, 0.6, 0.3])
def test_teal_decode_path_matches_the_masked_reference(dtype, keep):
    model = tiny_decoder(dtype=dtype)
    sparsify_activations(model, TOKENS, keep=keep)
    layer = model.model.layers[0].mlp
    assert isinstance(layer, ThresholdFFN)
    x = torch.randn(6, 32, dtype=dtype, generator=torch.Generator().manual_seed(3))
    x_kept = torch.where(x.abs() > layer.tau_in, x, torch.zeros_like(x))
    w_gate, w_up, w_down = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
    h = layer.act_fn(x_kept @ w_gate.t()) * (x_kept @ w_up.t())
    want = reference_masked_ffn(x_kept, w_gate, w_up, w_down, (h.abs() > layer.tau_mid).to(dtype), layer.act_fn)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        rows = torch.cat([layer(x[t:t + 1]) for t in range(6)])  # one token at a time: the input-sparse path
        torch.testing.assert_close(rows, want, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(layer(x), want, rtol=tolerance, atol=tolerance)  # batched: dense with zeros
    fraction = layer.active_fraction(x)
    expected = (2 * (x_kept != 0).double().mean() + (h.abs() > layer.tau_mid).double().mean()) / 3
    assert fraction == pytest.approx(float(expected))
    assert (fraction == 1.0) == (keep == 1.0)


def test_compact_active_fraction_equals_the_analysis():
    model = tiny_decoder(dtype=torch.float64)
    add_masks(model, MaskConfig(experts=4, top_k=2))
    shape_gates(model, shared=slice(0, 10), dead=slice(10, 18))
    captured = {}
    for name, layer in masked_ffns(model):  # the inputs the analysis sees
        layer.register_forward_hook(lambda m, args, out, name=name: captured.setdefault(name, args[0]))
    analysis = analyze_masks(model.eval(), TOKENS)
    compact_model(model, analysis)
    layers = dict(compact_layers(model))
    for report in analysis.layers:
        x = captured[report.name].reshape(-1, 32)
        assert layers[report.name].active_fraction(x) == pytest.approx(report.active_ratio, abs=1e-12)


def test_round_robin_interleaves_and_takes_medians():
    calls = []
    samples = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 5.0, 7.0, 6.0])}
    measures = {name: (lambda name=name, it=it: calls.append(name) or next(it)) for name, it in samples.items()}
    assert round_robin(measures, rounds=3) == {"a": 2.0, "b": 6.0}  # the first call of each is the warm-up
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]


def test_latency_of_models_side_by_side():
    models = {"dense": tiny_decoder(), "half": tiny_decoder(intermediate_size=32)}
    result = measure_latency(models, TOKENS, rounds=1, prompt=8, decode_steps=4, prefill_batch=2)
    assert set(result) == {"dense", "half"}
    for row in result.values():
        assert row["decode_ms_per_token"] > 0 and row["prefill_ms"] > 0 and row["prefill_tokens"] == 48


def test_sweep_compares_every_method_and_writes_the_report(tmp_path, tiny_llama_dir, capsys, one_torch_thread):
    from upcycle.data.splits import SplitConfig
    from upcycle.io import read_json
    from upcycle.masks import commands

    out = tmp_path / "sweep"
    commands.sweep(str(tiny_llama_dir), out=str(out), data=str(corpus_dir(tmp_path)), eval_blocks=3, targets=[0.5],
                   recipe=small_recipe(steps=6), baselines=BaselineSettings(moefication_experts=4), latency_rounds=1,
                   splits=SplitConfig(validation=0.25, test=0.25))
    printed = capsys.readouterr().out
    summary = read_json(out / "sweep.json")
    assert summary["quality_split"] == "test"
    points = {p["method"]: p for p in summary["points"]}
    assert set(points) == {"dense", "masks", "moefication", "pruning", "teal"}
    for point in points.values():
        assert len(point["layer_active_ratios"]) == 2
        assert point["achieved_active_ratio"] == pytest.approx(sum(point["layer_active_ratios"]) / 2)
        assert point["perplexity"] == point["perplexities"]["test"] > 1
        assert point["latency"]["decode_ms_per_token"] > 0
    assert points["dense"]["achieved_active_ratio"] == 1.0 and points["dense"]["decode_speedup"] == 1.0
    assert points["moefication"]["layer_active_ratios"] == [0.5, 0.5]  # top-2 of 4 equal neuron clusters
    assert points["pruning"]["layer_active_ratios"] == [0.5, 0.5] and points["pruning"]["kept_neurons"] == 32
    train_tokens = 6 * 2 * 32
    assert points["pruning"]["training_tokens"] == points["masks"]["training_tokens"] == train_tokens
    assert points["moefication"]["training_tokens"] == train_tokens
    assert abs(points["teal"]["achieved_active_ratio"] - 0.5) < 0.15  # thresholds calibrated on training tokens
    masks_run = read_json(out / "masks-0.5" / "masks.json")
    assert len(masks_run["evaluation"]["layer_active_ratios"]) == 2
    report = (out / "report.md").read_text()
    assert "Achieved active fraction per layer" in report and "MoEfication" in report and "pareto.png" in report
    assert (out / "pareto.png").stat().st_size > 0
    assert "report.md" in printed

    again = dict(summary, targets=[0.75], command="second", config=dict(summary["config"], target=0.75),
                 points=[dict(p, target=0.75) for p in summary["points"]])
    merged = merge_sweeps([summary, again])
    assert merged["targets"] == [0.5, 0.75] and merged["merged_from"] == 2
    assert [p["method"] for p in merged["points"]].count("dense") == 1 and len(merged["points"]) == 9
    write_sweep(merged, tmp_path / "merged")
    assert "Merged from 2 sweeps" in (tmp_path / "merged" / "report.md").read_text()
    with pytest.raises(UserError, match="different config"):
        merge_sweeps([summary, dict(again, config={})])


def test_sweep_and_train_refuse_bad_input(tmp_path, tiny_llama_dir, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from upcycle.cli import main
    from upcycle.masks import commands

    with pytest.raises(UserError, match="unknown method 'magic'"):
        commands.sweep(str(tiny_llama_dir), methods=["masks", "magic"], out=str(tmp_path / "a"))
    assert main(["masks", "sweep", "--base", str(tiny_llama_dir), "--baselines.moefication_experts", "0",
                 "--out", str(tmp_path / "b")]) == 2
    assert "--baselines.moefication_experts must be >= 1" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    for command in (commands.train, commands.sweep):
        with pytest.raises(UserError, match="no SwiGLU FFN") as error:
            command(str(gpt2), out=str(tmp_path / "c"))
        assert "\n" not in str(error.value)
