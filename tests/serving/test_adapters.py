"""Reading PEFT adapters: the fast safetensors reader equals the library's, and bad files are clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.serving.adapters import CONFIG_NAME, WEIGHTS_NAME, read_adapter, read_buffer, read_safetensors, read_spec
from upcycle.serving.errors import AdapterError
from upcycle.serving.synthetic import CORRUPTIONS, write_corrupt_adapter


def test_fast_reader_equals_safetensors_load_file(fake_run_dir, tmp_path):
    path = fake_run_dir / "experts" / "expert-00001" / WEIGHTS_NAME
    reference, fast = load_file(path), read_safetensors(path)
    assert reference.keys() == fast.keys()
    for key, tensor in reference.items():
        assert fast[key].dtype == tensor.dtype and torch.equal(fast[key], tensor)
    mixed = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.float64).view(2, 3),
             "c": torch.zeros(0, 4)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    for key, tensor in read_safetensors(tmp_path / "mixed.safetensors").items():
        assert torch.equal(tensor, mixed[key]) and tensor.dtype == mixed[key].dtype


@pytest.mark.parametrize("damage", ["truncate", "header", "nan"])
def test_damaged_weights_are_adapter_errors(fake_run_dir, tmp_path, damage):
    expert = tmp_path / "expert"
    shutil.copytree(fake_run_dir / "experts" / "expert-00000", expert)
    weights = expert / WEIGHTS_NAME
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    else:
        tensors = load_file(weights)
        next(iter(tensors.values()))[0, 0] = float("nan")
        save_file(tensors, weights)
    with pytest.raises(AdapterError, match="corrupt|NaN"):
        read_adapter(expert)


@pytest.mark.parametrize("values, accepted", [((float("inf"),), False), ((float("-inf"), float("inf")), False),
                                              ((3e38, 3e38), True), ((-3e38, -3e38, 3e38), True)])
def test_the_finite_check_decides_by_element_not_by_sum(fake_run_dir, tmp_path, values, accepted):
    """The fast check sums the weights; finite weights whose sum overflows must still load, and inf must not."""
    expert = tmp_path / "expert"
    shutil.copytree(fake_run_dir / "experts" / "expert-00000", expert)
    tensors = load_file(expert / WEIGHTS_NAME)
    first = next(iter(tensors.values())).view(-1)
    first[: len(values)] = torch.tensor(values)
    save_file(tensors, expert / WEIGHTS_NAME)
    if accepted:
        assert read_adapter(expert).nbytes > 0
    else:
        with pytest.raises(AdapterError, match="NaN or inf"):
            read_adapter(expert)


def test_unsupported_configs_are_refused_by_name(fake_run_dir, tmp_path):
    expert = tmp_path / "expert"
    shutil.copytree(fake_run_dir / "experts" / "expert-00000", expert)
    config = json.loads((expert / CONFIG_NAME).read_text())
    for field, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all")):
        (expert / CONFIG_NAME).write_text(json.dumps({**config, field: value}))
        with pytest.raises(AdapterError, match=field):
            read_spec(expert)
    (expert / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="unreadable"):
        read_spec(expert)


def test_adapter_views_are_the_file_tensors_with_peft_scaling(fake_run_dir):
    expert = fake_run_dir / "experts" / "expert-00002"
    reference = load_file(expert / WEIGHTS_NAME)
    weights = read_adapter(expert)
    assert weights.nbytes == (expert / WEIGHTS_NAME).stat().st_size and weights.rank == 4
    for name, (a, b, scaling) in weights.modules.items():
        assert scaling == 2.0  # lora_alpha 8 / r 4
        assert torch.equal(a, reference[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(b, reference[f"base_model.model.{name}.lora_B.weight"])


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_adapter_views_are_right_when_the_data_starts_unaligned(fake_run_dir, tmp_path, pad):
    """The views slice one flat view of the file when offsets are aligned; a foreign writer that does not pad its
    header to the element size must still read right (through per-matrix views)."""
    import struct

    source = fake_run_dir / "experts" / "expert-00002"
    shutil.copytree(source, tmp_path / "x")
    raw = (source / WEIGHTS_NAME).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = raw[8: 8 + length] + b" " * pad  # JSON allows trailing spaces; the data moves by `pad` bytes
    (tmp_path / "x" / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length:])
    reference = read_adapter(source).modules
    for name, (a, b, _) in read_adapter(tmp_path / "x").modules.items():
        assert torch.equal(a, reference[name][0]) and torch.equal(b, reference[name][1]) and a.is_contiguous()


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_hostile_files_are_adapter_errors_not_crashes(fake_run_dir, tmp_path, kind):
    """Each of these once escaped as AttributeError / ZeroDivisionError / RecursionError and killed the engine."""
    expert = write_corrupt_adapter(fake_run_dir / "experts" / "expert-00000", tmp_path / kind, kind)
    with pytest.raises(AdapterError, match="corrupt|rank 0|nested too deeply"):
        read_adapter(expert)


@pytest.mark.parametrize(("field", "value"), [("shape", [-1, 0]), ("shape", [True, 4]), ("shape", "4"),
                                              ("data_offsets", [0, 4, 8]), ("data_offsets", [-4, 0]),
                                              ("dtype", ["F32"])])
def test_malformed_header_fields_are_adapter_errors(fake_run_dir, tmp_path, field, value):
    expert = tmp_path / "expert"
    shutil.copytree(fake_run_dir / "experts" / "expert-00000", expert)
    raw = (expert / WEIGHTS_NAME).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + size])
    name = next(n for n in header if n != "__metadata__")
    header[name][field] = value
    encoded = json.dumps(header).encode()
    (expert / WEIGHTS_NAME).write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + size:])
    with pytest.raises(AdapterError, match="corrupt"):
        read_adapter(expert)


@pytest.mark.parametrize(("field", "value"), [("r", 0), ("lora_alpha", float("nan")), ("target_modules", "(["),
                                              ("alpha_pattern", {"([": 2.0}), ("rank_pattern", {"x": "many"})])
def test_bad_config_values_are_refused(fake_run_dir, tmp_path, field, value):
    expert = tmp_path / "expert"
    shutil.copytree(fake_run_dir / "experts" / "expert-00000", expert)
    config = json.loads((expert / CONFIG_NAME).read_text())
    (expert / CONFIG_NAME).write_text(json.dumps({**config, field: value}))
    with pytest.raises(AdapterError):
        read_spec(expert)


def test_files_sharing_a_header_keep_their_own_weights_and_errors(fake_run_dir, tmp_path):
    """Header parsing is cached by the header's bytes: files with the same header must still read their own data,
    and a NaN in one of them must still be found (the finite check is per file, not per header)."""
    source = fake_run_dir / "experts" / "expert-00000"
    reference = load_file(source / WEIGHTS_NAME)
    twins = {}
    for name, shift in [("same", 0.0), ("shifted", 1.5), ("nan", float("nan"))]:
        twins[name] = tmp_path / name
        shutil.copytree(source, twins[name])
        tensors = {key: tensor + shift if key.endswith("lora_A.weight") else tensor.clone()
                   for key, tensor in reference.items()}
        save_file(tensors, twins[name] / WEIGHTS_NAME)
    headers = {(path / WEIGHTS_NAME).read_bytes()[:200] for path in twins.values()}
    assert len(headers) == 1  # same header bytes, so the parse is shared
    for name in ("same", "shifted", "same"):
        for module, (a, _, _) in read_adapter(twins[name]).modules.items():
            shift = 1.5 if name == "shifted" else 0.0
            assert torch.equal(a, reference[f"base_model.model.{module}.lora_A.weight"] + shift)
    with pytest.raises(AdapterError, match="NaN"):
        read_adapter(twins["nan"])


def test_reading_into_a_given_buffer_gives_the_same_weights(fake_run_dir):
    buffer = read_buffer(1)  # too small: a fresh one is used and the given one is left alone
    first = fake_run_dir / "experts" / "expert-00000"
    assert read_adapter(first, into=buffer).raw is not buffer and buffer[:1] == b"\x00"
    buffer = read_buffer(read_adapter(first).nbytes + 100)  # room to spare: read into it, the tail not counted
    for expert in ("expert-00000", "expert-00001"):
        into, fresh = read_adapter(fake_run_dir / "experts" / expert, into=buffer), read_adapter(first.parent / expert)
        assert into.nbytes == fresh.nbytes and into.raw.obj is buffer
        for (a, b, scaling), (a2, b2, scaling2) in zip(into.modules.values(), fresh.modules.values(), strict=True):
            assert torch.equal(a, a2) and torch.equal(b, b2) and scaling == scaling2
