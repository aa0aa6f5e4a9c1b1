"""Instruction mixtures: (task, prompt, response) examples, split by document, tokenised with response-only labels.

Two sources:
- `stdlib` (the default) or a folder of `.py` files: a FLAN-style mixture of code tasks made with `ast`.
  Every function with a docstring yields up to one example per task type, each rendered through one of several
  templates (chosen by a hash, so the same function always gets the same wording). Task types:
  docstring_to_code, code_to_docstring, complete_code, list_arguments, name_function, return_value.
- a `.jsonl` / `.json` / `.parquet` file or `hf:NAME[:CONFIG][@SPLIT]`: one example per row, with configurable
  prompt / response / task fields (rows without the task field belong to task `instruction`).

Splits reuse `data.splits`: for `stdlib` a source file is the document, so all examples made from one file share
its split; for a dataset each row is its own document. Task types named in `held_out` never appear in the
instruction-tuning mixture; they are for zero-shot evaluation and task fine-tuning.

Tokenised examples keep the prompt's labels at IGNORE_INDEX, so the loss is on the response (and its EOS) only.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from upcycle.data.corpus import STDLIB, Document, load_documents
from upcycle.data.splits import SPLITS, SplitConfig, split_documents
from upcycle.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TASK = "instruction"  # task of dataset rows that have no task field


@dataclass(frozen=True)
class Example:
    """One instruction example: the model reads `prompt` and is trained to continue it with `response`."""

    task: str
    prompt: str
    response: str
    source: str  # the document it was made from (a file path or `dataset#row`)


@dataclass
class MixtureConfig:
    """Which instruction data, which task types train and which are held out, and how examples are capped."""

    data: str = STDLIB
    """'stdlib' or a folder of .py files (the code-task mixture), a .jsonl/.json/.parquet file with prompt and
    response columns, or 'hf:NAME[:CONFIG][@SPLIT]'."""
    prompt_field: str = "prompt"
    """Dataset column holding the prompt (not used for 'stdlib')."""
    response_field: str = "response"
    """Dataset column holding the response (not used for 'stdlib')."""
    task_field: str = "task"
    """Dataset column naming the task type; rows without it are task 'instruction'."""
    tasks: list[str] | None = None
    """Task types in the instruction-tuning mixture (default: every task type that is not held out)."""
    held_out: list[str] = field(default_factory=lambda: ["name_function", "return_value"])
    """Task types kept out of instruction tuning, for zero-shot evaluation and task fine-tuning."""
    max_examples_per_task: int = 3000
    """Cap on the examples of each task type in each split (a deterministic, hash-ordered subset)."""
    max_function_chars: int = 360
    """'stdlib': skip functions whose source (docstring removed) is longer than this."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """Held-out fractions of documents (the split is by a hash of each document's text)."""

    def __post_init__(self) -> None:
        if self.max_examples_per_task < 1:
            raise UserError(f"max_examples_per_task must be >= 1, got {self.max_examples_per_task}")
        if self.max_function_chars < 40:
            raise UserError(f"max_function_chars must be >= 40, got {self.max_function_chars}")
        if self.is_code:
            unknown = sorted(set(self.held_out).union(self.tasks or []) - set(CODE_TASKS))
            if unknown:
                raise UserError(f"unknown task type(s) {', '.join(unknown)}; the stdlib mixture has "
                                f"{', '.join(CODE_TASKS)}")
        overlap = sorted(set(self.held_out).intersection(self.tasks or []))
        if overlap:
            raise UserError(f"task type(s) {', '.join(overlap)} are both held out and in the training mixture")

    @property
    def is_code(self) -> bool:
        """True when the examples are made from Python source (stdlib or a folder), not read from a dataset."""
        from pathlib import Path

        return self.data == STDLIB or Path(self.data).expanduser().is_dir()


# ---------------------------------------------------------------------------------------------------------------
# The embedded code-task mixture


@dataclass(frozen=True)
class Function:
    """A function parsed out of a module: what the task makers need."""

    name: str
    code: str  # dedented source, docstring removed
    summary: str  # first line of the docstring
    args: list[str]
    returns: list[str]  # source of each `return <expr>` in the function's own body


TaskMaker = Callable[[Function], "tuple[dict[str, str], str] | None"]

TEMPLATES: dict[str, list[str]] = {
    "docstring_to_code": [
        "Write a Python function {name} that does this: {summary}\n",
        "Task: {summary}\nImplement it as the Python function {name}.\n",
        "Python function {name}. Docstring: {summary}\nCode:\n",
    ],
    "code_to_docstring": [
        "{code}\nSummarise in one line what this function does.\n",
        "Write a one-line docstring for this function:\n{code}\n",
        "{code}\nWhat does it do?\n",
    ],
    "complete_code": [
        "Complete this Python function:\n{head}\n",
        "Continue:\n{head}\n",
        "Finish the code.\n{head}\n",
    ],
    "list_arguments": [
        "{code}\nList the parameters of this function.\n",
        "Which arguments does this function take?\n{code}\nArguments:",
        "{code}\nParameters:",
    ],
    "name_function": [
        "{masked}\nWhat is this function called?\n",
        "Name the function ___:\n{masked}\nName:",
        "{masked}\nSuggest the function's name.\n",
    ],
    "return_value": [
        "{code}\nWhat expression does this function return?\n",
        "What does this function return?\n{code}\nReturns:",
        "{code}\nReturn value:",
    ],
}


def _docstring_to_code(fn: Function) -> tuple[dict[str, str], str] | None:
    return {"name": fn.name, "summary": fn.summary}, fn.code


def _code_to_docstring(fn: Function) -> tuple[dict[str, str], str] | None:
    return {"code": fn.code}, fn.summary


def _complete_code(fn: Function) -> tuple[dict[str, str], str] | None:
    lines = fn.code.splitlines()
    if len(lines) < 4:
        return None
    cut = len(lines) // 2
    return {"head": "\n".join(lines[:cut])}, "\n".join(lines[cut:])


def _list_arguments(fn: Function) -> tuple[dict[str, str], str] | None:
    return {"code": fn.code}, ", ".join(fn.args) if fn.args else "none"


def _name_function(fn: Function) -> tuple[dict[str, str], str] | None:
    masked = re.sub(rf"\b{re.escape(fn.name)}\b", "___", fn.code)
    return {"masked": masked}, fn.name


def _return_value(fn: Function) -> tuple[dict[str, str], str] | None:
    if len(fn.returns) != 1 or "\n" in fn.returns[0]:
        return None
    return {"code": fn.code}, fn.returns[0]


CODE_TASKS: dict[str, TaskMaker] = {
    "docstring_to_code": _docstring_to_code,
    "code_to_docstring": _code_to_docstring,
    "complete_code": _complete_code,
    "list_arguments": _list_arguments,
    "name_function": _name_function,
    "return_value": _return_value,
}


def parse_functions(text: str, max_chars: int) -> list[Function]:
    """Functions (and methods) of a module that have a one-line docstring summary and a body besides it."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
            continue
        docstring = (ast.get_docstring(node) or "").strip()
        if not docstring or len(node.body) < 2:
            continue
        summary = docstring.splitlines()[0].strip()
        doc_node = node.body[0]
        if not 8 <= len(summary) <= 120 or doc_node.lineno == node.lineno:
            continue
        kept = lines[node.lineno - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
        code = textwrap.dedent("\n".join(line for line in kept if line.strip()))
        if len(code) > max_chars or "\t" in code:
            continue
        args = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
        args += [f"*{node.args.vararg.arg}"] if node.args.vararg else []
        args += [f"**{node.args.kwarg.arg}"] if node.args.kwarg else []
        out.append(Function(name=node.name, code=code, summary=summary, args=args,
                            returns=[ast.get_source_segment(text, r.value) or "" for r in _own_returns(node)]))
    return out


def _own_returns(node: ast.AST) -> Iterable[ast.Return]:
    """`return <expr>` statements of this function, not of functions or classes nested in it."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, ast.Return) and child.value is not None:
            yield child
        yield from _own_returns(child)


def _stable_hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:8], "big")


def code_examples(doc: Document, tasks: Sequence[str], max_chars: int) -> list[Example]:
    """Every example the given task types make from one module's functions, each through a hashed template."""
    examples = []
    for index, fn in enumerate(parse_functions(doc.text, max_chars)):
        for task in tasks:
            made = CODE_TASKS[task](fn)
            if made is None:
                continue
            fields, response = made
            if not response.strip():
                continue
            templates = TEMPLATES[task]
            template = templates[_stable_hash(doc.id, str(index), task) % len(templates)]
            examples.append(Example(task=task, prompt=template.format(**fields), response=response, source=doc.id))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Datasets with prompt / response columns


def dataset_examples(config: MixtureConfig) -> list[tuple[Document, Example]]:
    """(document, example) per usable row of a .jsonl/.json/.parquet file or `hf:` dataset."""
    from pathlib import Path

    import datasets

    spec = config.data
    datasets.disable_progress_bars()
    try:
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition("@")
            name, _, subset = name.partition(":")
            table = datasets.load_dataset(name, subset or None, split=split or "train")
        else:
            path = Path(spec).expanduser()
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
            if not path.is_file() or builder is None:
                raise UserError(f"--data {spec}: give 'stdlib', a folder of .py files, an existing "
                                ".jsonl/.json/.parquet file or 'hf:NAME[:CONFIG][@SPLIT]'")
            if path.stat().st_size == 0:
                raise UserError(f"--data {spec}: the file is empty")
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as error:  # datasets raises many types for malformed or missing data
        raise UserError(f"--data {spec}: could not be read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    for name in (config.prompt_field, config.response_field):
        if name not in table.column_names:
            raise UserError(f"--data {spec}: no column '{name}' (columns: {', '.join(table.column_names) or 'none'})"
                            "; set --mixture.prompt_field / --mixture.response_field")
    has_task = config.task_field in table.column_names
    out = []
    for i, row in enumerate(table):
        prompt, response = row[config.prompt_field], row[config.response_field]
        if not prompt or not response:
            continue
        task = str(row[config.task_field]) if has_task and row[config.task_field] else DEFAULT_TASK
        source = f"{Path(spec).name if not spec.startswith('hf:') else spec}#{i}"
        example = Example(task=task, prompt=str(prompt), response=str(response), source=source)
        out.append((Document(id=source, text=f"{example.prompt}\x1e{example.response}"), example))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The mixture


@dataclass
class InstructionMixture:
    """Examples by split, then by task type. `train_tasks` make the instruction-tuning mixture."""

    examples: dict[str, dict[str, list[Example]]]
    train_tasks: list[str]
    held_out: list[str]

    def select(self, split: str, tasks: Sequence[str]) -> list[Example]:
        """The split's examples of the given task types, interleaved task by task (a balanced mixture order)."""
        pools = [self.examples[split].get(task, []) for task in tasks]
        out = []
        for i in range(max((len(p) for p in pools), default=0)):
            out.extend(pool[i] for pool in pools if i < len(pool))
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per split and task type."""
        return {split: {task: len(v) for task, v in by_task.items()} for split, by_task in self.examples.items()}


def build_mixture(config: MixtureConfig) -> InstructionMixture:
    """Make (or read) every example, split them by document, cap each task type; UserError when nothing is usable."""
    if config.is_code:
        docs = [d for d in load_documents(config.data) if d.id.endswith(".py")]
        if not docs:
            raise UserError(f"--data {config.data}: no .py files to make code tasks from")
        parts = split_documents(docs, config.splits)
        per_split = {split: [e for d in parts[split] for e in code_examples(d, list(CODE_TASKS),
                                                                              config.max_function_chars)]
                     for split in SPLITS}
        available = list(CODE_TASKS)
    else:
        pairs = dataset_examples(config)
        if not pairs:
            raise UserError(f"--data {config.data}: no rows with both a prompt and a response")
        by_text = {}
        for doc, example in pairs:
            by_text.setdefault(doc.text, example)  # exact duplicates collapse, as split_documents does
        parts = split_documents([doc for doc, _ in pairs], config.splits)
        per_split = {split: [by_text[d.text] for d in parts[split]] for split in SPLITS}
        available = sorted({e.task for _, e in pairs})
        unknown = sorted(set(config.held_out).union(config.tasks or []) - set(available))
        if unknown:
            raise UserError(f"--data {config.data}: unknown task type(s) {', '.join(unknown)}; the data has "
                            f"{', '.join(available)}")
    train_tasks = list(config.tasks) if config.tasks else [t for t in available if t not in config.held_out]
    if not train_tasks:
        raise UserError("no task types left for the instruction-tuning mixture; hold fewer out")
    examples: dict[str, dict[str, list[Example]]] = {}
    for split in SPLITS:
        by_task: dict[str, list[Example]] = {}
        for example in per_split[split]:
            by_task.setdefault(example.task, []).append(example)
        examples[split] = {task: _capped(by_task.get(task, []), config.max_examples_per_task)
                           for task in [*train_tasks, *config.held_out]}
    mixture = InstructionMixture(examples=examples, train_tasks=train_tasks, held_out=list(config.held_out))
    if not mixture.select("train", train_tasks):
        raise UserError(f"--data {config.data}: no training examples for the task types {', '.join(train_tasks)}")
    return mixture


def _capped(examples: list[Example], cap: int) -> list[Example]:
    """At most `cap` examples, chosen and ordered by a hash of their content (independent of corpus order)."""
    ranked = sorted(examples, key=lambda e: _stable_hash(e.task, e.source, e.prompt, e.response))
    return ranked[:cap]


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation: response-only labels, rows of at most block_size tokens


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels (IGNORE_INDEX over the prompt)."""

    input_ids: list[int]
    labels: list[int]
    task: str = ""


def encode_examples(tokenizer, examples: Sequence[Example], block_size: int) -> tuple[list[Encoded], int]:
    """Tokenise prompt and response separately (response + EOS are the labelled part); drop examples that do not
    fit in `block_size` tokens. Returns (encoded, number dropped)."""
    from upcycle.data.packing import IGNORE_INDEX

    if not examples:
        return [], 0
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, dropped = [], 0
    for example, prompt, response in zip(examples, prompts, responses, strict=True):
        ids = prompt + response + eos
        if len(ids) > block_size or not prompt:
            dropped += 1
            continue
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(prompt) + response + eos, task=example.task))
    return out, dropped


def pack_examples(encoded: Sequence[Encoded], block_size: int, pad_id: int):
    """Rows [N, block_size] holding whole examples back to back (greedy, in order), padded at the end.

    Returns (input_ids, labels) int64 tensors; labels are IGNORE_INDEX over prompts and padding. Padding only
    ever trails a row, which is what the MoE loss's padding mask assumes.
    """
    rows: list[list[Encoded]] = []
    used = block_size + 1
    for example in encoded:
        if used + len(example.input_ids) > block_size:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example.input_ids)
    return _to_tensors([[t for e in row for t in e.input_ids] for row in rows],
                       [[t for e in row for t in e.labels] for row in rows], block_size, pad_id)


def pad_examples(encoded: Sequence[Encoded], block_size: int, pad_id: int):
    """One example per row, right-padded: (input_ids, labels) [N, block_size] for per-example evaluation."""
    return _to_tensors([e.input_ids for e in encoded], [e.labels for e in encoded], block_size, pad_id)


def _to_tensors(ids: list[list[int]], labels: list[list[int]], block_size: int, pad_id: int):
    import torch

    from upcycle.data.packing import IGNORE_INDEX

    inputs = torch.full((len(ids), block_size), pad_id, dtype=torch.long)
    targets = torch.full((len(ids), block_size), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        inputs[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets
