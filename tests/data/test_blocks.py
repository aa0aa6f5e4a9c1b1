"""Corpus -> split -> token blocks: whole training blocks, capped held-out blocks, refusals that name the data."""

from __future__ import annotations

import pytest

from tests.conftest import stdlib_code_dir
from upcycle.data.blocks import corpus_blocks, corpus_splits, sample_texts, token_blocks
from upcycle.data.corpus import Document
from upcycle.data.packing import IGNORE_INDEX
from upcycle.data.splits import SplitConfig
from upcycle.errors import UserError

MODULES = ["json/decoder.py", "json/encoder.py", "email/message.py", "email/utils.py", "asyncio/queues.py",
           "asyncio/locks.py", "textwrap.py", "heapq.py", "bisect.py", "fractions.py", "shlex.py", "glob.py"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return str(stdlib_code_dir(tmp_path_factory.mktemp("corpus"), MODULES))


def test_training_blocks_are_whole_and_held_out_blocks_are_capped(corpus, tiny_tokenizer):
    splits = SplitConfig(validation=0.25, test=0.25)
    parts = corpus_splits(corpus, splits, required=("train", "validation"))
    blocks = token_blocks(tiny_tokenizer, parts, 32, splits=("train", "validation", "test"), eval_blocks=3)
    inputs, labels = blocks["train"]
    assert inputs.shape[1] == 32 and (labels != IGNORE_INDEX).all()
    for split in ("validation", "test"):
        if parts[split]:
            assert 0 < blocks[split][0].shape[0] <= 3
    # a token budget reads a seeded sample of the training documents
    small = token_blocks(tiny_tokenizer, parts, 32, splits=("train",), train_tokens=100, seed=1)["train"][0]
    assert 0 < small.shape[0] < inputs.shape[0]
    again = corpus_blocks(tiny_tokenizer, corpus, splits, 32, names=("train",), train_tokens=100, seed=1)["train"][0]
    assert again.equal(small)


def test_sample_texts_is_seeded_and_stops_near_the_budget():
    docs = [Document(id=str(i), text="x" * 60) for i in range(20)]
    first = sample_texts(docs, tokens=30, seed=3)
    assert first == sample_texts(docs, tokens=30, seed=3) and len(first) == 3  # 3 x 60 chars >= 30 tokens x 6


def test_empty_required_splits_and_too_little_text_are_refused(corpus, tiny_tokenizer):
    with pytest.raises(UserError, match="too few documents for a training and a validation split"):
        corpus_splits(corpus, SplitConfig(validation=0.0, test=0.0), required=("train", "validation"))
    with pytest.raises(UserError, match="not enough text for one block"):
        corpus_blocks(tiny_tokenizer, corpus, SplitConfig(), 10**7)
