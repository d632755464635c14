"""Shared fixtures: tiny seeded GQA models (odd, distinct sizes) and the real demo model."""

from __future__ import annotations

import os

import pytest
import torch

from gqaprune_core.tiny import char_tokenizer, tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))

# name -> keyword arguments of tiny_model; every variant keeps hidden 48 and vocab 97.
TINY_VARIANTS = {
    "llama": {},  # 6 query heads, 2 KV heads: q_per_kv 3
    "qwen2_bias": {"architecture": "qwen2"},  # q/k/v biases
    "mha": {"q_heads": 4, "kv_heads": 4, "head_dim": 12},  # q_per_kv 1
    "q_per_kv4": {"q_heads": 8, "kv_heads": 2, "head_dim": 6},
    "mistral": {"architecture": "mistral"},
}


@pytest.fixture
def make_tiny():
    """Factory: ``make_tiny(variant="llama", **overrides)`` → a fresh seeded model."""

    def factory(variant: str = "llama", **overrides):
        return tiny_model(**(TINY_VARIANTS[variant] | overrides))

    return factory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_ids():
    """(2, 16) seeded token ids in the tiny vocabulary."""
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def profile_windows():
    """``(fit, ids)``: (6, 24) and (4, 20) seeded token ids in the tiny vocabulary, the fit and
    profile windows of sensitivity-profile tests."""
    generator = torch.Generator().manual_seed(3)
    return (torch.randint(0, 97, (6, 24), generator=generator),
            torch.randint(0, 97, (4, 20), generator=generator))


@pytest.fixture(scope="session")
def demo():
    """The real demo model and tokenizer (SmolLM2-135M), loaded once per test session.

    Tests that use it must not modify it in place: deep-copy first.
    """
    from gqaprune_core.models import load_model

    return load_model("demo", device="cpu")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine idle OpenMP workers spin:
    one thread keeps these tests ~10x faster there. Restored afterwards.
    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
