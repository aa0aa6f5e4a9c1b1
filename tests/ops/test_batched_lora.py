"""The batched multi-adapter LoRA op equals its plain loop reference, and a wrapped HF model equals PEFT per row."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from upcycle.ops.batched_lora import (
    attach_multi_lora,
    batched_lora,
    lora_bgmv,
    lora_single_slot,
)
from upcycle.ops.reference_lora import reference_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _problem(n: int, t: int | None, i: int, o: int, r: int, s: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, i) if t is None else (n, t, i)
    x = torch.randn(shape, generator=gen).to(dtype)
    base_out = torch.randn((*shape[:-1], o), generator=gen).to(dtype)
    a = torch.randn(s, r, i, generator=gen).to(dtype)
    b = torch.randn(s, o, r, generator=gen).to(dtype)
    idx = torch.randint(-1, s, (n,), generator=gen)
    scale = torch.rand(s, generator=gen).to(dtype) + 0.5
    return x, base_out, a, b, idx, scale


def _reference64(x, base_out, a, b, idx, scale):
    as64 = [None if v is None else v.double() for v in (x, base_out, a, b, scale)]
    return reference_lora(as64[0], as64[1], as64[2], as64[3], idx, as64[4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,t", [(1, None), (7, None), (1, 1), (3, 5), (8, 2)])
def test_batched_lora_matches_reference(dtype, n, t):
    for (i, o), r, s, with_scale in itertools.product([(16, 24), (32, 8)], [1, 4, 8], [1, 5], [False, True]):
        x, base_out, a, b, idx, scale = _problem(n, t, i, o, r, s, dtype, seed=n * 100 + r + s)
        scale = scale if with_scale else None
        expected = _reference64(x, base_out, a, b, idx, scale)
        got = batched_lora(x, base_out.clone(), a, b, idx, scale)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.double(), expected, atol=tol * max(1, r), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bgmv_and_single_slot_paths_match_reference(dtype):
    x, base_out, a, b, _, _ = _problem(4, 3, 16, 12, 4, 3, dtype)
    slots = torch.tensor([2, 0, 2, 1])
    expected = _reference64(x, base_out, a, b, slots, None)
    torch.testing.assert_close(lora_bgmv(x, base_out.clone(), a, b, slots).double(), expected,
                               atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])
    same = torch.full((4,), 1)
    expected = _reference64(x, base_out, a, b, same, None)
    torch.testing.assert_close(lora_single_slot(x, base_out.clone(), a, b, 1).double(), expected,
                               atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


def test_rows_without_adapter_are_untouched():
    x, base_out, a, b, _, scale = _problem(3, 2, 8, 8, 2, 2, torch.float32)
    got = batched_lora(x, base_out.clone(), a, b, torch.tensor([-1, -1, -1]), scale)
    assert torch.equal(got, base_out)


@pytest.fixture(scope="module")
def peft_adapters(tiny_llama_dir, tmp_path_factory):
    """Four PEFT adapters with different ranks, targets and scaling rules (all saved by PEFT itself)."""
    from upcycle.serving.synthetic import save_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "all-r8": dict(r=8, lora_alpha=16),
        "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rslora-r2": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj", "k_proj"]),
        "patterns": dict(r=4, lora_alpha=8, rank_pattern={"up_proj": 6}, alpha_pattern={"q_proj": 3.0}),
    }
    return {name: save_peft_adapter(tiny_llama_dir, root / name, seed=k + 1, **spec)
            for k, (name, spec) in enumerate(specs.items())}


def test_mixed_batch_equals_peft_per_row(tiny_llama_dir, peft_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=6, max_rank=8)
    names = list(peft_adapters)
    slot_of = {name: slot for slot, name in zip([3, 0, 5, 1], names, strict=True)}
    for name, path in peft_adapters.items():
        lora.load_slot(slot_of[name], lora.pack(read_adapter(path).modules))

    rows = ["patterns", None, "all-r8", "qv-r4", "rslora-r2", "all-r8"]
    input_ids = torch.randint(5, model.config.vocab_size, (len(rows), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lora.select([slot_of[r] if r else -1 for r in rows]):
        mixed = model(input_ids).logits
    with torch.no_grad():
        base_logits = model(input_ids).logits  # selection cleared: the wrapped model is the base model again

    for row, name in enumerate(rows):
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
        if name is not None:
            reference = PeftModel.from_pretrained(reference, peft_adapters[name]).eval()
        with torch.no_grad():
            alone = reference(input_ids[row: row + 1]).logits
        torch.testing.assert_close(mixed[row: row + 1], alone, atol=1e-5, rtol=1e-5)
        if name is not None:
            assert not torch.allclose(alone, base_logits[row: row + 1], atol=1e-3), "adapter should change logits"
    torch.testing.assert_close(base_logits[1:2], mixed[1:2], atol=1e-6, rtol=1e-6)


def test_single_adapter_batch_uses_gather_free_path(tiny_llama_dir, peft_adapters):
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=2, max_rank=8)
    lora.load_slot(1, lora.pack(read_adapter(peft_adapters["all-r8"]).modules))
    ids = torch.randint(5, 100, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), lora.select([1, 1, 1]):
        assert lora.batch.single_slot == 1
        fast = model(ids).logits
    # same slot through the gathered path: force it by mixing in a base row
    with torch.no_grad(), lora.select([1, 1, 1, -1]):
        assert lora.batch.single_slot is None
        gathered = model(torch.cat([ids, ids[:1]])).logits[:3]
    torch.testing.assert_close(fast, gathered, atol=1e-5, rtol=1e-5)


def test_merged_single_slot_path_equals_gathered_and_follows_slot_rewrites(tiny_llama_dir, peft_adapters):
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=2, max_rank=8, merge_single_slot=True)
    lora.batch.merge_after = 0  # merge on the first single-slot forward
    ids = torch.randint(5, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    for name in ("all-r8", "patterns", "qv-r4"):  # rewriting slot 1 must invalidate the merged weight
        lora.load_slot(1, lora.pack(read_adapter(peft_adapters[name]).modules))
        with torch.no_grad(), lora.select([1, 1]):
            merged = model(ids).logits
        with torch.no_grad(), lora.select([1, 1, -1]):
            gathered = model(torch.cat([ids, ids[:1]])).logits[:2]
        torch.testing.assert_close(merged, gathered, atol=1e-5, rtol=1e-5)
    assert "model.layers.0.self_attn.q_proj.merged_weight" not in model.state_dict()


def test_gathered_weights_follow_slot_rewrites_under_the_same_selection(tiny_llama_dir, peft_adapters):
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    ids = torch.randint(5, 100, (3, 4), generator=torch.Generator().manual_seed(3))

    def forward(model, lora, slot2: str):
        # both adapters target every wrapped layer, so no layer is cleared (which would also invalidate)
        lora.load_slot(0, lora.pack(read_adapter(peft_adapters["all-r8"]).modules))
        lora.load_slot(2, lora.pack(read_adapter(peft_adapters[slot2]).modules))
        with torch.no_grad(), lora.select([2, 0, -1]):
            return model(ids).logits

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=3, max_rank=8)
    forward(model, lora, "all-r8")  # gathers slot 2 = all-r8 for selection [2, 0, -1]
    rewritten = forward(model, lora, "patterns")  # same selection, slot 2 rewritten: must regather
    fresh_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    fresh = attach_multi_lora(fresh_model, DEFAULT_TARGETS, n_slots=3, max_rank=8)
    torch.testing.assert_close(rewritten, forward(fresh_model, fresh, "patterns"), atol=1e-6, rtol=1e-6)


def test_merging_waits_for_a_streak_on_one_slot_and_restarts_after_a_rewrite(tiny_llama_dir, peft_adapters):
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=2, max_rank=8, merge_single_slot=True)
    lora.batch.merge_after = 3
    layer = lora.layers["model.layers.0.mlp.down_proj"]
    lora.load_slot(1, lora.pack(read_adapter(peft_adapters["all-r8"]).modules))
    ids = torch.randint(5, 100, (1, 4), generator=torch.Generator().manual_seed(4))
    outputs = []
    for _ in range(5):
        with torch.no_grad(), lora.select([1]):
            outputs.append(model(ids).logits)
        outputs.append(layer._merged_slot)
    assert outputs[1::2] == [-1, -1, -1, 1, 1]  # merged on the 4th forward in a row, kept after
    for logits in outputs[2::2]:
        torch.testing.assert_close(logits, outputs[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), lora.select([0]):  # another slot breaks the streak
        model(ids)
    with torch.no_grad(), lora.select([1]):
        model(ids)
    assert lora.batch.single_streak == 1 and layer._merged_slot == 1  # still merged: slot 1 was not rewritten
    lora.load_slot(1, lora.pack(read_adapter(peft_adapters["patterns"]).modules))
    assert layer._merged_slot == -1 and lora.batch.single_streak == 0  # a rewrite forgets the merge and the streak


def test_a_known_run_length_merges_at_once_when_it_reaches_break_even_and_never_when_short(tiny_llama_dir,
                                                                                          peft_adapters):
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=2, max_rank=8, merge_single_slot=True)
    lora.batch.merge_after = 4
    layer = lora.layers["model.layers.0.mlp.down_proj"]
    lora.load_slot(0, lora.pack(read_adapter(peft_adapters["all-r8"]).modules))
    lora.load_slot(1, lora.pack(read_adapter(peft_adapters["patterns"]).modules))
    ids = torch.randint(5, 100, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), lora.select([0]):
        unmerged = model(ids).logits
    merged_at = []
    for ahead in (2, 1, 0):  # a 3-forward run on slot 1, below break-even: never merges, even past merge_after
        with torch.no_grad(), lora.select([1], ahead=ahead):
            model(ids)
        merged_at.append(layer._merged_slot)
    for ahead in (3, 2, 1, 0):  # a 4-forward run on slot 0: merges on its first forward
        with torch.no_grad(), lora.select([0], ahead=ahead):
            logits = model(ids).logits
        merged_at.append(layer._merged_slot)
        torch.testing.assert_close(logits, unmerged, atol=1e-5, rtol=1e-5)
    assert merged_at == [-1, -1, -1, 0, 0, 0, 0]


def test_layers_of_one_shape_share_a_slot_stack_and_a_slot_fill_writes_each_layer(tiny_llama_dir, peft_adapters):
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=3, max_rank=8)
    shapes = {(layer.in_features, layer.out_features) for layer in lora.layers.values()}
    assert len(lora.stacks) == len(shapes) < len(lora.layers)
    weights = read_adapter(peft_adapters["patterns"]).modules  # ranks 4 and 6: zero-padded to 8
    lora.load_slot(2, lora.pack(weights))
    for name, layer in lora.layers.items():
        assert layer.lora_a.untyped_storage().data_ptr() == layer._stack.a.untyped_storage().data_ptr()
        lora_a, lora_b, scaling = weights[name]
        rank = lora_a.shape[0]
        torch.testing.assert_close(layer.lora_a[2, :rank], lora_a)
        torch.testing.assert_close(layer.lora_b[2, :, :rank], lora_b * scaling)
        assert torch.all(layer.lora_a[2, rank:] == 0) and torch.all(layer.lora_a[:2] == 0)
    lora.clear_slot(2)
    assert all(torch.all(stack.a == 0) and torch.all(stack.bt == 0) for stack in lora.stacks)


def test_gathered_rows_stay_right_through_joins_departures_and_rewrites():
    """The gathered-row buffers copy only rows whose slot changed: over a random sequence of batch compositions and
    slot rewrites, every forward must still equal `batched_lora` gathering all rows from scratch."""
    from upcycle.ops.batched_lora import batched_lora

    generator = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12), nn.Linear(12, 10))  # two shapes: two stacks
    lora = attach_multi_lora(model, ["0", "1", "2"], n_slots=5, max_rank=3, max_rows=8)
    assert len(lora.stacks) == 2

    def random_adapter() -> dict:
        return {name: (torch.randn(3, layer.in_features, generator=generator),
                       torch.randn(layer.out_features, 3, generator=generator), 0.5)
                for name, layer in lora.layers.items()}

    for slot in range(5):
        lora.load_slot(slot, lora.pack(random_adapter()))
    rows = [0, 1, 2]
    for step in range(40):
        event = torch.randint(0, 4, (1,), generator=generator).item()
        if event == 0 and len(rows) < 8:  # a request joins at the end
            rows.append(torch.randint(-1, 5, (1,), generator=generator).item())
        elif event == 1 and len(rows) > 2:  # one leaves: the last row moves into its place
            gone = torch.randint(0, len(rows), (1,), generator=generator).item()
            rows[gone] = rows[-1]
            rows.pop()
        elif event == 2:  # an adapter is swapped into a slot some rows may use
            lora.load_slot(torch.randint(0, 5, (1,), generator=generator).item(), lora.pack(random_adapter()))
        x = torch.randn(len(rows), 2, 12, generator=generator)
        with torch.no_grad(), lora.select(rows):
            got = model(x)
        expected = x
        with torch.no_grad():
            for layer in model:
                base = nn.functional.linear(expected, layer.base_layer.weight, layer.base_layer.bias)
                expected = batched_lora(expected, base, layer.lora_a, layer.lora_b, torch.tensor(rows))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}, rows {rows}")


def _packed_by(pack_fn, stack, chosen) -> tuple[torch.Tensor, torch.Tensor]:
    """A stack's layout written by `pack_fn` into buffers full of NaN (so a value it fails to write shows)."""
    a = torch.full(stack.a[:, 0].shape, float("nan"), dtype=stack.a.dtype)
    bt = torch.full(stack.bt[:, 0].shape, float("nan"), dtype=stack.bt.dtype)
    pack_fn(chosen, a, bt)
    return a, bt


@pytest.mark.parametrize("slot_dtype", [torch.float32, torch.bfloat16])
def test_packing_a_full_rank_adapter_by_stack_equals_packing_it_layer_by_layer(slot_dtype):
    """`pack` stacks an adapter that fills every layer of a stack at full rank in one go; it must lay it out exactly
    as the per-layer path (rank padding, untargeted layers, scaling per layer) would, also into a reused buffer."""
    from upcycle.ops.batched_lora import _pack_full, _pack_padded

    generator = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(10, 12), nn.Linear(12, 10)).to(slot_dtype)
    lora = attach_multi_lora(model, ["0", "1", "2"], n_slots=2, max_rank=3)
    weights = {name: (torch.randn(3, layer.in_features, generator=generator),
                      torch.randn(layer.out_features, 3, generator=generator), 16 / (index + 3) ** 0.5)  # rsLoRA-like
               for index, (name, layer) in enumerate(lora.layers.items())}
    packed = lora.pack(weights)
    for i, stack in enumerate(lora.stacks):
        chosen = {layer._position: weights[name] for name, layer in lora.layers.items() if layer._stack is stack}
        slow_a, slow_bt = _packed_by(_pack_padded, stack, chosen)
        fast_a, fast_bt = _packed_by(_pack_full, stack, chosen)
        assert fast_a.dtype == slow_a.dtype == slot_dtype and torch.equal(fast_a, slow_a)
        assert torch.equal(packed.a[i], slow_a) and torch.equal(packed.bt[i], slow_bt)
        torch.testing.assert_close(fast_bt, slow_bt, atol=0, rtol=0)
    partial = {name: weights[name] for name in ("0", "1")}  # layer "2" untargeted: its stack takes the padded path
    reused = lora.pack(partial, into=packed)  # the full adapter's memory must not leak into the partial one
    assert reused is packed
    for i, stack in enumerate(lora.stacks):
        chosen = {layer._position: partial[name] for name, layer in lora.layers.items()
                  if layer._stack is stack and name in partial}
        expected_a, expected_bt = _packed_by(_pack_padded, stack, chosen)
        assert torch.equal(lora.pack(partial).a[i], expected_a) and torch.equal(lora.pack(partial).bt[i], expected_bt)
        assert torch.equal(reused.a[i], expected_a) and torch.equal(reused.bt[i], expected_bt)
    other = attach_multi_lora(nn.Sequential(nn.Linear(12, 10)).to(slot_dtype), ["0"], n_slots=2, max_rank=4)
    with pytest.raises(ValueError, match="packed for another model"):
        other.pack({"0": weights["0"]}, into=packed)


def _llama_like(hidden: int, ffn: int, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(config)


def test_merge_break_even_follows_the_ratio_of_weight_to_adapter_size():
    """A merge rewrites the wrapped weights; an unmerged forward reads the adapter: the break-even run length is
    their size ratio times the measured constant, so a wider model waits longer before merging."""
    from upcycle.ops.batched_lora import MERGE_STEPS_PER_SIZE_RATIO
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    found = []
    for hidden, ffn in [(64, 192), (256, 768)]:
        model = _llama_like(hidden, ffn, layers=2)
        linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1]
                   in DEFAULT_TARGETS]
        weights = sum(m.in_features * m.out_features for m in linears)
        slot = sum(8 * (m.in_features + m.out_features) for m in linears)  # r = 8: A [8, in] and B [out, 8]
        lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=2, max_rank=8, merge_single_slot=True)
        assert lora.batch.merge_after == max(1, round(MERGE_STEPS_PER_SIZE_RATIO * weights / slot))
        found.append(lora.batch.merge_after)
    assert found[1] > found[0]


def test_a_forward_over_part_of_the_batch_keeps_each_rows_gathered_adapter_in_place(tiny_llama_dir, peft_adapters):
    """The engine runs prefilling rows apart from decoding ones (`select(..., first=)`): every part must equal the
    whole batch's rows, and a part must not overwrite the gathered A and B^T of rows outside it."""
    from transformers import AutoModelForCausalLM

    from upcycle.serving.adapters import read_adapter
    from upcycle.serving.synthetic import DEFAULT_TARGETS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lora = attach_multi_lora(model, DEFAULT_TARGETS, n_slots=4, max_rank=8, max_rows=6)
    for slot, name in enumerate(["all-r8", "patterns", "qv-r4", "rslora-r2"]):
        lora.load_slot(slot, lora.pack(read_adapter(peft_adapters[name]).modules))
    slots = [0, 1, 2, 3, -1, 2]
    ids = torch.randint(5, 100, (len(slots), 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), lora.select(slots):
        whole = model(ids).logits
    stack = lora.stacks[0]
    held, before = list(stack._held), stack._rows_a[:, : len(slots)].clone()
    with torch.no_grad(), lora.select(slots[3:], first=3):
        tail = model(ids[3:]).logits
    torch.testing.assert_close(tail, whole[3:], atol=1e-5, rtol=1e-5)
    # the part's rows sat in their own places already: nothing was gathered again, nothing outside it overwritten
    assert stack._held == held and torch.equal(stack._rows_a[:, : len(slots)], before)
    with torch.no_grad(), lora.select(slots[:2], first=1):  # rows 1-2 now hold slots 0 and 1
        model(ids[1:3])
    assert stack._held[0] == held[0] and stack._held[3:] == held[3:]
    with torch.no_grad(), lora.select(slots):  # rows 1-2 gathered back
        torch.testing.assert_close(model(ids).logits, whole, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="max_rows"):
        lora.select([0, 1], first=5).__enter__()
