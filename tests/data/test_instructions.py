"""Instruction mixtures: code tasks from ast, splits by document, held-out task types, response-only labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import stdlib_code_dir
from upcycle.data.corpus import Document
from upcycle.data.instructions import (
    CODE_TASKS,
    MixtureConfig,
    build_mixture,
    code_examples,
    encode_examples,
    pack_examples,
    parse_functions,
)
from upcycle.data.packing import IGNORE_INDEX
from upcycle.data.splits import SPLITS, SplitConfig
from upcycle.errors import UserError

MODULES = ["json/decoder.py", "json/encoder.py", "email/utils.py", "textwrap.py", "heapq.py", "fractions.py",
           "shutil.py", "gettext.py", "string.py", "statistics.py", "glob.py", "base64.py"]
HELD_OUT = ["name_function", "return_value"]

SOURCE = '''
def area(width, height=1, *rest, scale, **extra):
    """Return the area of a rectangle.

    More words.
    """

    value = width * height
    return value * scale


def no_docstring(x):
    return x


class Box:
    def size(self):
        """Size of the box, in cubic metres."""
        if self.empty:
            return 0
        return self.w * self.h
'''


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory) -> Path:
    """A folder with 12 standard-library modules."""
    return stdlib_code_dir(tmp_path_factory.mktemp("code"), MODULES)


def _config(data, **overrides) -> MixtureConfig:
    return MixtureConfig(data=str(data), held_out=HELD_OUT, splits=SplitConfig(validation=0.2, test=0.2), **overrides)


@pytest.fixture(scope="module")
def mixture(code_dir):
    return build_mixture(_config(code_dir))


def test_parse_functions_strips_docstring_and_reads_signature():
    functions = {f.name: f for f in parse_functions(SOURCE, max_chars=1000)}
    assert set(functions) == {"area", "size"}  # no_docstring has none
    area = functions["area"]
    assert area.summary == "Return the area of a rectangle."
    assert '"""' not in area.code and "More words" not in area.code and area.code.startswith("def area(")
    assert area.args == ["width", "height", "scale", "*rest", "**extra"]
    assert area.returns == ["value * scale"]
    assert functions["size"].code.startswith("def size(self):")  # dedented method
    assert functions["size"].returns == ["0", "self.w * self.h"]


def test_code_examples_make_each_task_and_mask_the_name():
    examples = code_examples(Document("m.py", SOURCE), list(CODE_TASKS), max_chars=1000)
    by_task = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    named = [e for e in by_task["name_function"] if e.response == "area"]
    assert named and "area" not in named[0].prompt and "___" in named[0].prompt
    assert [e.response for e in by_task["return_value"]] == ["value * scale"]  # size() has two returns: skipped
    assert {e.response for e in by_task["list_arguments"]} == {"width, height, scale, *rest, **extra", "self"}
    assert all(e.source == "m.py" for e in examples)
    assert code_examples(Document("m.py", SOURCE), list(CODE_TASKS), 1000) == examples  # same templates again


def test_mixture_is_deterministic_and_capped_by_hash_order(code_dir, mixture):
    assert all(mixture.examples[s][t] for s in SPLITS for t in ("docstring_to_code", "name_function"))
    capped = build_mixture(_config(code_dir, max_examples_per_task=5))  # built again, from scratch
    for split in SPLITS:
        for task, examples in capped.examples[split].items():
            assert examples == mixture.examples[split][task][:5]


def test_no_document_in_two_splits(mixture):
    sources = {split: {e.source for by_task in [mixture.examples[split]] for v in by_task.values() for e in v}
               for split in SPLITS}
    assert all(sources.values())
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]


def test_held_out_task_types_are_absent_from_the_training_mixture(mixture):
    assert set(mixture.train_tasks) == set(CODE_TASKS) - set(HELD_OUT)
    training = mixture.select("train", mixture.train_tasks)
    assert training and not {e.task for e in training} & set(HELD_OUT)
    assert {e.task for e in mixture.select("train", HELD_OUT)} == set(HELD_OUT)


def test_prompt_tokens_are_masked(tiny_tokenizer, mixture):
    examples = mixture.select("train", mixture.train_tasks)[:40]
    encoded, dropped = encode_examples(tiny_tokenizer, examples, block_size=10_000)
    assert dropped == 0 and len(encoded) == len(examples)
    for example, enc in zip(examples, encoded, strict=True):
        prompt = tiny_tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        assert enc.input_ids[:len(prompt)] == prompt
        assert enc.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
        response = enc.labels[len(prompt):]
        assert IGNORE_INDEX not in response and response[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(response[:-1]) == example.response


def test_packing_keeps_whole_examples_and_block_size(tiny_tokenizer, mixture):
    examples = mixture.select("train", mixture.train_tasks)[:60]
    encoded, dropped = encode_examples(tiny_tokenizer, examples, block_size=128)
    assert dropped == len(examples) - len(encoded) and all(len(e.input_ids) <= 128 for e in encoded)
    inputs, labels = pack_examples(encoded, 128, tiny_tokenizer.pad_token_id)
    assert inputs.shape[1] == 128 and inputs.shape[0] < len(encoded)  # several examples share rows
    # Every example's tokens appear once, in order; labelled tokens are exactly the responses (+ EOS).
    real = [t for row, lab in zip(inputs.tolist(), labels.tolist(), strict=True) for t, y in zip(row, lab)
            if not (y == IGNORE_INDEX and t == tiny_tokenizer.pad_token_id)]
    assert real[:len(encoded[0].input_ids)] == encoded[0].input_ids
    assert sum(int(y != IGNORE_INDEX) for y in labels.flatten().tolist()) == \
        sum(sum(int(y != IGNORE_INDEX) for y in e.labels) for e in encoded)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_dataset_with_custom_fields(tmp_path):
    rows = [{"q": f"question {i}?", "a": f"answer {i}", "kind": "qa" if i % 3 else "math"} for i in range(60)]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    config = MixtureConfig(data=str(path), prompt_field="q", response_field="a", task_field="kind", held_out=["math"],
                           splits=SplitConfig(validation=0.2, test=0.2))
    mixture = build_mixture(config)
    assert mixture.train_tasks == ["qa"]
    total = sum(len(v) for split in SPLITS for v in mixture.examples[split].values())
    assert total == 60
    assert {e.task for e in mixture.select("train", ["qa"])} == {"qa"}
    assert all(e.response == e.prompt.replace("question", "answer").rstrip("?")
               for split in SPLITS for v in mixture.examples[split].values() for e in v)


def test_rows_without_task_field_are_one_task(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)])
    mixture = build_mixture(MixtureConfig(data=str(path), held_out=[]))
    assert mixture.train_tasks == ["instruction"]


@pytest.mark.parametrize("case, message", [
    ("unknown_code_task", "unknown task type"),
    ("unknown_dataset_task", "unknown task type"),
    ("missing_field", "no column 'response'"),
    ("empty_file", "is empty"),
    ("no_rows", "no rows with both"),
    ("no_such_file", "give 'stdlib'"),
    ("held_out_and_trained", "both held out and in the training mixture"),
])
def test_bad_input_is_one_line_user_error(tmp_path, case, message):
    path = tmp_path / "d.jsonl"
    if case == "unknown_code_task":
        make = lambda: MixtureConfig(held_out=["translate"])  # noqa: E731
    elif case == "unknown_dataset_task":
        _write_jsonl(path, [{"prompt": "p", "response": "r", "task": "qa"}])
        make = lambda: build_mixture(MixtureConfig(data=str(path), held_out=["math"]))  # noqa: E731
    elif case == "missing_field":
        _write_jsonl(path, [{"prompt": "p", "answer": "r"}])
        make = lambda: build_mixture(MixtureConfig(data=str(path), held_out=[]))  # noqa: E731
    elif case == "empty_file":
        path.write_text("")
        make = lambda: build_mixture(MixtureConfig(data=str(path), held_out=[]))  # noqa: E731
    elif case == "no_rows":
        _write_jsonl(path, [{"prompt": "", "response": "r"}, {"prompt": "p", "response": None}])
        make = lambda: build_mixture(MixtureConfig(data=str(path), held_out=[]))  # noqa: E731
    elif case == "no_such_file":
        make = lambda: build_mixture(MixtureConfig(data=str(tmp_path / "nope.jsonl"), held_out=[]))  # noqa: E731
    else:
        make = lambda: MixtureConfig(tasks=["list_arguments"], held_out=["list_arguments"])  # noqa: E731
    with pytest.raises(UserError, match=message) as info:
        make()
    assert "\n" not in str(info.value)
