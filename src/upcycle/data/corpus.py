"""Read a corpus from a directory, a file, a Hugging Face datasets spec, or the embedded default.

Specs understood by `load_documents`:
- `stdlib` (the default): every `.py` file of the running Python's standard library, one document per file.
- a directory: every text file below it, one document per file (binary and non-UTF-8 files are skipped, counted).
- a `.txt` file: one document per paragraph (blank-line separated), read with `datasets`' text loader.
- a `.jsonl` / `.json` / `.parquet` file: one document per row, text in `text_field`.
- `hf:NAME[:CONFIG][@SPLIT]`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT)`, text in `text_field`.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UserError

log = logging.getLogger(__name__)

STDLIB = "stdlib"
_DATASET_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_DIRS = {"__pycache__", ".git", "site-packages", "node_modules"}


@dataclass(frozen=True)
class Document:
    """One unit of text: the thing that is embedded, clustered, split and routed as a whole."""

    id: str  # readable, unique within a corpus: a relative path or `source#row`
    text: str


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_documents(spec: str = STDLIB, text_field: str = "text", min_chars: int = 1) -> list[Document]:
    """Load documents from `spec` (see module docstring). Raises UserError for anything unusable."""
    if spec == STDLIB:
        docs = _read_directory(stdlib_root(), suffixes={".py"})
    elif spec.startswith("hf:"):
        docs = _read_hub_dataset(spec[3:], text_field)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            docs = _read_directory(path)
        elif path.is_file():
            docs = _read_data_file(path, text_field)
        else:
            raise UserError(f"--data {spec}: no such file or directory (give a folder, a .txt/.jsonl/.parquet file, "
                            f"'hf:NAME' or '{STDLIB}')")
    docs = [d for d in docs if len(d.text.strip()) >= min_chars]
    if not docs:
        raise UserError(f"--data {spec}: no usable text documents found (empty, binary or all shorter than "
                        f"{min_chars} characters)")
    return docs


def _read_directory(root: Path, suffixes: set[str] | None = None) -> list[Document]:
    docs, skipped = [], 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _SKIP_DIRS.intersection(rel.parts) or any(p.startswith(".") for p in rel.parts):
            continue
        if suffixes is not None and path.suffix not in suffixes:
            continue
        text = _read_text_file(path)
        if text is None:
            skipped += 1
            continue
        docs.append(Document(id=rel.as_posix(), text=text))
    if skipped:
        log.warning("skipped %d binary or non-UTF-8 files under %s", skipped, root)
    return docs


def _read_text_file(path: Path) -> str | None:
    """The file's text, or None when it is binary or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    return decode_text(raw)


def decode_text(raw: bytes) -> str | None:
    """`raw` as UTF-8 text, or None when it looks binary (a NUL in its first 8 KiB) or is not UTF-8."""
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_data_file(path: Path, text_field: str) -> list[Document]:
    builder = _DATASET_BUILDERS.get(path.suffix.lower())
    if builder is None:
        text = _read_text_file(path)
        if text is None:
            raise UserError(f"--data {path}: not a UTF-8 text file; give a .txt, .jsonl or .parquet file or a folder")
        return [Document(id=path.name, text=text)]
    if builder == "json":
        return _read_json_rows(path, text_field)
    import datasets

    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as error:  # datasets raises many types for malformed files
        raise UserError(f"--data {path}: could not be read as {builder} ({type(error).__name__}: {error})") from None
    return _rows_to_documents(table, text_field, path.name)


def _read_hub_dataset(spec: str, text_field: str) -> list[Document]:
    import datasets

    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        table = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as error:
        raise UserError(f"--data hf:{spec}: could not load ({type(error).__name__}); check the name, or that the "
                        "dataset is in the local Hugging Face cache when offline") from None
    return _rows_to_documents(table, text_field, name)


def _read_json_rows(path: Path, text_field: str) -> list[Document]:
    """Rows of a JSON Lines file (or of one JSON array), read here rather than by `datasets` so that an error names
    the line, and a text that is a number, boolean or object is refused instead of silently turned into a string."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"--data {path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    if content.lstrip().startswith("["):  # a .json file holding one array of rows
        try:
            rows = [(f"row {i}", row) for i, row in enumerate(json.loads(content))]
        except json.JSONDecodeError as error:
            raise UserError(f"--data {path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    else:
        rows = list(_json_lines(path, content))
    docs, columns = [], set()
    for i, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"--data {path}: {where} is a JSON {_json_type(row)}, not an object with a "
                            f"'{text_field}' field")
        columns.update(row)
        text = row.get(text_field)
        if text is None or text == "":
            continue  # a row without text is skipped, as `datasets` rows with a null field always were
        if not isinstance(text, str):
            raise UserError(f"--data {path}: {where}: '{text_field}' is a JSON {_json_type(text)}, not a string")
        docs.append(Document(id=f"{path.name}#{i}", text=text))
    if not docs and text_field not in columns:
        raise UserError(f"{path.name}: no field '{text_field}' (fields: {', '.join(sorted(columns)) or 'none'}); "
                        "set --text_field")
    return docs


def _json_lines(path: Path, content: str) -> Iterator[tuple[str, object]]:
    """("line N", parsed value) for every non-blank line, N counted from 1 as editors do."""
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"--data {path}: line {number} is not valid JSON ({error.msg} at column "
                            f"{error.colno})") from None


def _json_type(value: object) -> str:
    """JSON's name for the type of a parsed value, as a user who wrote the file would say it."""
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", dict: "object", list: "array", str: "string"}.get(type(value), "null")


def _rows_to_documents(table, text_field: str, source: str) -> list[Document]:
    if text_field not in table.column_names:
        raise UserError(f"{source}: no column '{text_field}' (columns: {', '.join(table.column_names)}); "
                        "set --text_field")
    texts = table[text_field]
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"{source}: row {bad}: column '{text_field}' holds {type(texts[bad]).__name__} values, not "
                        "text; set --text_field to a text column")
    return [Document(id=f"{source}#{i}", text=t) for i, t in enumerate(texts) if t]
