"""Perplexity: a hand computation, batch-size invariance, the demo model's plausible value."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gqaprune_core.data import evaluation_windows
from gqaprune_core.evaluate import evaluate_corpora, nll_from_hidden, perplexity, window_nll


def test_perplexity_matches_hand_computation(make_tiny):
    model = make_tiny()
    windows = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    total = 0.0
    with torch.no_grad():
        for row in windows:
            probs = torch.softmax(model(row[None]).logits[0].double(), dim=-1)
            total += sum(-math.log(probs[t, row[t + 1]]) for t in range(9))
    result = perplexity(model, windows, corpus="x")
    assert result.tokens == 27 and result.windows == 3 and result.seq_len == 10
    assert result.value == pytest.approx(math.exp(total / 27), rel=1e-5)


def test_batch_size_does_not_change_perplexity(make_tiny):
    model = make_tiny()
    windows = torch.randint(0, 97, (5, 20), generator=torch.Generator().manual_seed(1))
    one = perplexity(model, windows, batch_size=1).value
    four = perplexity(model, windows, batch_size=4).value
    assert one == pytest.approx(four, rel=1e-6)


def test_progress_and_window_cap(make_tiny):
    calls = []
    windows = torch.randint(0, 97, (5, 8), generator=torch.Generator().manual_seed(1))
    result = perplexity(make_tiny(), windows, batch_size=2, max_windows=3,
                        progress=lambda d, t: calls.append((d, t)))
    assert result.windows == 3 and calls == [(2, 3), (3, 3)]


def test_evaluate_corpora_one_entry_each(make_tiny, tiny_tokenizer):
    results = evaluate_corpora(make_tiny(), tiny_tokenizer, ["demo", "pydoc"], seq_len=32,
                               max_windows=2)
    assert [r.corpus for r in results] == ["demo", "pydoc"]
    assert all(r.tokens == 62 for r in results)


@pytest.mark.demo
def test_demo_perplexity_is_plausible(demo):
    model, tokenizer = demo
    windows = evaluation_windows(tokenizer, "demo", seq_len=512, max_windows=4)
    result = perplexity(model, windows, corpus="demo")
    assert 10 < result.value < 100, result


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_head_equals_full_logits(make_tiny, chunk):
    """The LM head in chunks of positions gives the same per-window NLL as full logits."""
    model = make_tiny("qwen2_bias")
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.model(ids, use_cache=False).last_hidden_state
        chunked = nll_from_hidden(model, hidden, ids, normalized=True, chunk_tokens=chunk)
        logits = model(ids).logits[:, :-1].float()
        full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").view(3, -1).double().sum(dim=1)
    assert torch.allclose(chunked, full, rtol=1e-6, atol=1e-6)
    assert torch.allclose(window_nll(model, ids), full, rtol=1e-6, atol=1e-6)
