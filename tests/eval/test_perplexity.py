"""Held-out loss: batched per-document scoring against the one-document-at-a-time reference, per-token
log-probabilities and their mixtures against plain loops, mean loss, perplexity."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from upcycle.data.packing import IGNORE_INDEX, pack
from upcycle.eval.perplexity import document_log_probs, document_nll, mix_log_probs, token_nll


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def reference(model, documents, pad_id, block_size):
    """Each document packed into its own blocks and scored alone: what evaluation did before batching."""
    pairs = [token_nll(model, *pack([doc], block_size, pad_id)) for doc in documents]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=9), batch_size=st.integers(1, 5),
       seed=st.integers(0, 1000))
def test_document_nll_matches_scoring_each_document_alone(tiny_model, lengths, batch_size, seed):
    rng = np.random.default_rng(seed)
    vocab = tiny_model.config.vocab_size
    documents = [rng.integers(1, vocab, n).tolist() for n in lengths]
    nll, count = document_nll(tiny_model, documents, pad_id=0, block_size=32, batch_size=batch_size)
    ref_nll, ref_count = reference(tiny_model, documents, 0, 32)
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-4)


def test_padding_does_not_leak_into_real_tokens(tiny_model):
    """A short document scored beside a long one gets the same NLL as alone (right padding, causal attention)."""
    short, long = list(range(3, 12)), list(range(5, 60))
    alone, _ = document_nll(tiny_model, [short], pad_id=0)
    together, _ = document_nll(tiny_model, [short, long], pad_id=0)
    assert together[0] == pytest.approx(alone[0], rel=1e-5)
    assert torch.is_grad_enabled()  # the no_grad decorator leaves the caller's mode alone


def test_mean_loss_and_perplexity_agree_with_token_nll(tiny_model):
    from upcycle.eval.perplexity import mean_loss, perplexity

    inputs = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    labels = inputs.clone()
    labels[-1, 7:] = IGNORE_INDEX
    total, count = token_nll(tiny_model, inputs, labels, batch_size=2)
    assert count == 4 * 11 + 6
    assert mean_loss(tiny_model, inputs, labels, batch_size=3) == pytest.approx(total / count, rel=1e-6)
    assert perplexity(tiny_model, inputs, labels) == pytest.approx(math.exp(total / count), rel=1e-6)


@torch.no_grad()
def reference_log_probs(model, document, block_size):
    """Plain float64 loop: each block run alone, log softmax of the logits at t - 1 read at token t."""
    out = []
    for start in range(0, len(document), block_size):
        block = torch.tensor(document[start:start + block_size])[None]
        if block.shape[1] < 2:
            continue
        logits = model(input_ids=block).logits[0, :-1].double()
        out += [float(torch.log_softmax(logits[t], -1)[block[0, t + 1]]) for t in range(block.shape[1] - 1)]
    return np.array(out)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=6), batch_size=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_document_log_probs_match_a_plain_loop_token_by_token(tiny_model, lengths, batch_size, seed):
    rng = np.random.default_rng(seed)
    documents = [rng.integers(1, tiny_model.config.vocab_size, n).tolist() for n in lengths]
    batched = document_log_probs(tiny_model, documents, pad_id=0, block_size=16, batch_size=batch_size)
    for doc, log_probs in zip(documents, batched):
        expected = reference_log_probs(tiny_model, doc, 16)
        assert log_probs.shape == expected.shape
        np.testing.assert_allclose(log_probs, expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 4), tokens=st.integers(0, 6), seed=st.integers(0, 1000))
def test_mix_log_probs_matches_a_plain_loop(k, tokens, seed):
    rng = np.random.default_rng(seed)
    log_probs = [rng.uniform(-30, 0, tokens) for _ in range(k)]
    weights = rng.dirichlet(np.ones(k))
    expected = [math.log(sum(w * math.exp(lp[t]) for w, lp in zip(weights, log_probs))) for t in range(tokens)]
    np.testing.assert_allclose(mix_log_probs(log_probs, weights), expected, rtol=1e-12)


def test_a_mixture_with_one_weight_of_one_is_that_member():
    rng = np.random.default_rng(0)
    first, second = rng.uniform(-20, 0, 9), rng.uniform(-20, 0, 9)
    second[3] = -np.inf  # a member with weight 0 drops out, whatever its log-probabilities
    np.testing.assert_allclose(mix_log_probs([first, second], [1.0, 0.0]), first, rtol=1e-12)
