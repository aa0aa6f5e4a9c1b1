import json

import pytest

from upcycle.data import SplitConfig, load_documents, split_documents, split_of
from upcycle.data.corpus import Document
from upcycle.data.packing import IGNORE_INDEX, pack
from upcycle.errors import UserError


def test_directory_skips_binary_and_non_utf8(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    return 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("hello world")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs = load_documents(str(tmp_path))
    assert sorted(d.id for d in docs) == ["a.py", "sub/b.txt"]


def test_jsonl_text_field_and_missing_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"row {i}", "n": i}) for i in range(3)))
    docs = load_documents(str(path), text_field="body")
    assert [d.text for d in docs] == ["row 0", "row 1", "row 2"]
    with pytest.raises(UserError, match="set --text_field$"):  # the real flag, not --text-field
        load_documents(str(path), text_field="text")


@pytest.mark.parametrize(("value", "kind"), [("12", "number"), ("3.5", "number"), ("true", "boolean"),
                                             ('{"a": "b"}', "object"), ('["x"]', "array")])
def test_jsonl_text_that_is_not_a_string_is_refused_naming_the_line(tmp_path, value, kind):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": ' + value + '}\n')
    with pytest.raises(UserError, match=f"line 3: 'text' is a JSON {kind}, not a string"):
        load_documents(str(path))


@pytest.mark.parametrize(("line", "needle"), [('{"text": "unterminated', "line 2 is not valid JSON"),
                                              ('"just a string"', "line 2 is a JSON string, not an object")])
def test_jsonl_bad_line_is_named(tmp_path, line, needle):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + '\n{"text": "also fine"}\n')
    with pytest.raises(UserError, match=needle):
        load_documents(str(path))


def test_jsonl_rows_without_text_are_skipped_and_ids_count_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": null}\n{"other": 1}\n{"text": "c"}\n')
    assert [(d.id, d.text) for d in load_documents(str(path))] == [
        ("data.jsonl#0", "a"), ("data.jsonl#1", "b"), ("data.jsonl#4", "c")]  # ids as `datasets` numbered rows


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [d.text for d in load_documents(str(path))] == ["a", "b"]
    path.write_text(json.dumps([{"text": "a"}, {"text": 7}]))
    with pytest.raises(UserError, match="row 1: 'text' is a JSON number"):
        load_documents(str(path))


def test_parquet_column_that_is_not_text_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match="row 0: column 'text' holds int values"):
        load_documents(str(tmp_path / "d.parquet"))


def test_parquet_and_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta"]}), tmp_path / "d.parquet")
    assert [d.text for d in load_documents(str(tmp_path / "d.parquet"))] == ["alpha", "beta"]
    (tmp_path / "d.txt").write_text("first para\nstill first\n\nsecond para\n")
    assert len(load_documents(str(tmp_path / "d.txt"))) == 2


@pytest.mark.parametrize("make", ["missing", "empty_dir", "binary_only"])
def test_bad_corpus_is_a_user_error(tmp_path, make):
    if make == "missing":
        spec = str(tmp_path / "nope")
    elif make == "empty_dir":
        spec = str(tmp_path)
    else:
        (tmp_path / "x.bin").write_bytes(b"\x00" * 100)
        spec = str(tmp_path)
    with pytest.raises(UserError):
        load_documents(spec)


def test_stdlib_default_is_real_multi_topic_code():
    docs = load_documents()
    ids = {d.id for d in docs}
    assert len(docs) > 500 and "json/decoder.py" in ids and "email/message.py" in ids


def test_split_is_by_content_hash_and_disjoint():
    docs = [Document(id=f"d{i}", text=f"document number {i} " * (i % 7 + 1)) for i in range(2000)]
    splits = split_documents(docs, SplitConfig(validation=0.1, test=0.1))
    texts = [{d.text for d in s} for s in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(map(len, texts)) == 2000
    assert 150 < len(splits["test"]) < 250  # ~10 %
    # The split depends only on the text: renaming or reordering changes nothing.
    renamed = Document(id="other", text=docs[5].text)
    assert split_of(renamed, SplitConfig(0.1, 0.1)) == split_of(docs[5], SplitConfig(0.1, 0.1))
    again = split_documents(list(reversed(docs)), SplitConfig(validation=0.1, test=0.1))
    assert {d.id for d in again["test"]} == {d.id for d in splits["test"]}


def test_duplicates_are_dropped_so_they_cannot_straddle_splits():
    docs = [Document("a", "same text"), Document("b", "same text"), Document("c", "other")]
    splits = split_documents(docs)
    assert sum(len(v) for v in splits.values()) == 2


def test_pack_concatenates_pads_the_tail_and_masks_its_labels():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    inputs, labels = pack(seqs, block_size=4, pad_id=0)
    # 9 tokens = 2 full blocks + 1 leftover token, which predicts nothing and is dropped
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.tolist() == inputs.tolist()
    inputs, labels = pack([[1, 2, 3, 4, 5, 6]], block_size=4, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert labels.tolist() == [[1, 2, 3, 4], [5, 6, IGNORE_INDEX, IGNORE_INDEX]]
    inputs, _ = pack([[1, 2, 3, 4, 5, 6]], block_size=4, keep_remainder=False)
    assert inputs.tolist() == [[1, 2, 3, 4]]
