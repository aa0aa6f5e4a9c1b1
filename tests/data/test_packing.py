"""Tokenising long documents in bounded pieces: the same ids as one call, and memory that does not grow with them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import small_corpus_texts
from upcycle.data.packing import BATCH_CHARS, PIECE_CHARS, pack, text_pieces, token_ids, tokenize


def _one_line(chars: int) -> str:
    """Real code with its newlines made spaces (as minified JS or JSON on one line), `chars` long."""
    text = " ".join(t.replace("\n", " ") for t in small_corpus_texts())
    return (text * (chars // len(text) + 1))[:chars]


@pytest.mark.parametrize("size", [7, 64, 1000])
def test_pieces_rebuild_the_text_and_respect_the_bound(size):
    for text in [*small_corpus_texts()[:3], _one_line(20_000), "x" * 5000, "a  b   c    d " * 300]:
        pieces = list(text_pieces(text, size))
        assert "".join(pieces) == text and all(0 < len(p) <= size for p in pieces)


def test_piecewise_ids_equal_whole_text_ids(tiny_tokenizer, monkeypatch):
    import upcycle.data.packing as packing

    monkeypatch.setattr(packing, "PIECE_CHARS", 300)  # many cuts in a short text
    texts = [_one_line(30_000), small_corpus_texts()[4], "spaces  and\n\n  newlines \t mixed " * 200]
    for text in texts:
        whole = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = list(text_pieces(text, 300))
        assert len(pieces) > 10
        ids = np.concatenate([tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces])
        assert ids.tolist() == whole


def test_tokenize_hands_the_tokenizer_bounded_pieces(tiny_tokenizer):
    calls = []

    def spy(texts, **kwargs):
        calls.append([len(t) for t in ([texts] if isinstance(texts, str) else texts)])
        return tiny_tokenizer(texts, **kwargs)

    spy.eos_token_id = tiny_tokenizer.eos_token_id
    texts = [_one_line(700_000), "def f():\n    return 1\n", small_corpus_texts()[0]]
    ids = tokenize(spy, texts)
    assert max(max(c) for c in calls) <= PIECE_CHARS and max(sum(c) for c in calls) < BATCH_CHARS + PIECE_CHARS
    assert len(calls) > 2  # the long text took several calls
    for text, seq in zip(texts, ids):
        assert seq[-1] == tiny_tokenizer.eos_token_id
        assert seq[:-1].tolist() == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_max_tokens_equals_slicing_and_stops_early(tiny_tokenizer):
    text = _one_line(400_000)
    full = tokenize(tiny_tokenizer, [text])[0]
    assert tokenize(tiny_tokenizer, [text], max_tokens=1000)[0].tolist() == full[:1000].tolist()
    assert token_ids(tiny_tokenizer, "short text", max_tokens=1000).tolist() == full[:0].tolist() + \
        tiny_tokenizer("short text", add_special_tokens=False)["input_ids"]


def test_pack_takes_arrays_and_lists_alike():
    as_lists = pack([[1, 2, 3], [4, 5, 6, 7]], 3, pad_id=0)
    as_arrays = pack([np.array([1, 2, 3], dtype=np.int32), np.array([4, 5, 6, 7], dtype=np.int32)], 3, pad_id=0)
    assert all((a == b).all() for a, b in zip(as_lists, as_arrays))
    assert pack([], 4)[0].shape == (0, 4)


def test_a_long_single_line_document_tokenizes_in_bounded_memory(tiny_llama_dir, tmp_path):
    """Peak RSS growth while tokenizing a 2 MB one-line document (before the fix: ~300 MB; after: ~0)."""
    import os

    import upcycle

    (tmp_path / "doc.txt").write_text(_one_line(2_000_000))
    script = f"""
import resource
from transformers import AutoTokenizer
from upcycle.data.packing import tokenize
tokenizer = AutoTokenizer.from_pretrained({str(tiny_llama_dir)!r})
text = open({str(tmp_path / 'doc.txt')!r}).read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = tokenize(tokenizer, [text])[0]
print(len(ids), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(upcycle.__file__).parents[1]))  # the sources under test
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    tokens, grew_mb = map(int, out.split())
    assert tokens > 250_000 and grew_mb < 100, f"{tokens} tokens, peak RSS grew {grew_mb} MB"
