"""Perplexity: token-weighted next-token NLL over non-overlapping windows of a stated length."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gqaprune_core.data import evaluation_windows

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class PerplexityResult:
    """exp(total NLL / tokens) over ``windows`` windows of ``seq_len`` tokens each."""

    corpus: str
    value: float
    seq_len: int
    windows: int
    tokens: int  # tokens scored: windows * (seq_len - 1)
    nll: float  # mean NLL per token, nats

    def to_dict(self) -> dict:
        return asdict(self)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


HEAD_CHUNK_TOKENS = 8192  # positions per LM-head call: (chunk, V) float32 logits at a time


def _has_plain_head(model: nn.Module) -> bool:
    """Llama-family layout (``model.model`` then ``lm_head``, no logit soft-capping)."""
    return (hasattr(model, "model") and model.get_output_embeddings() is not None
            and getattr(model.config, "final_logit_softcapping", None) is None)


def nll_from_hidden(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, *,
                    normalized: bool, chunk_tokens: int = HEAD_CHUNK_TOKENS) -> torch.Tensor:
    """Summed next-token NLL (float64) of each row, (B,), from hidden states (B, T, E).

    The LM head (and the final norm unless ``normalized``) runs ``chunk_tokens`` positions at a
    time, so the (B, T, V) logits are never held at once: with a 128k vocabulary a batch of
    16k positions would otherwise need 8 GB of float32 logits.
    """
    head, norm = model.get_output_embeddings(), model.model.norm
    width = hidden.shape[-1]
    states = hidden[:, :-1].reshape(-1, width)
    targets = ids[:, 1:].reshape(-1).to(hidden.device)
    losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.numel(), chunk_tokens):
        part = states[start:start + chunk_tokens]
        logits = head(part if normalized else norm(part)).float()
        losses[start:start + chunk_tokens] = F.cross_entropy(
            logits, targets[start:start + chunk_tokens], reduction="none")
    return losses.view(ids.shape[0], -1).double().sum(dim=1)


@torch.no_grad()
def window_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (float64) of each row of ``batch`` (B, T) → (B,)."""
    batch = batch.to(_device(model))
    if _has_plain_head(model):
        hidden = model.model(batch, use_cache=False).last_hidden_state
        return nll_from_hidden(model, hidden, batch, normalized=True).cpu()
    logits = model(batch, use_cache=False).logits[:, :-1]
    targets = batch[:, 1:]
    # Flattened (B*T, V) rows: cross_entropy over a transposed (B, V, T) view is far slower.
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction="none")
    return loss.view(targets.shape).double().sum(dim=1).cpu()


def auto_batch_size(model: nn.Module, seq_len: int) -> int:
    """Windows per forward pass: 4 on CPU; about 16k tokens on a GPU, where small batches
    leave most of the chip idle (the LM head is chunked, so logits stay small)."""
    if _device(model).type == "cuda":
        return max(1, 16384 // seq_len)
    return 4


def perplexity(model: nn.Module, windows: torch.Tensor, *, corpus: str = "",
               batch_size: int | None = None,
               max_windows: int | None = None, progress: Progress | None = None
               ) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (N, T), each window scored on its own.

    Every window contributes T - 1 predicted tokens; the result is exp of the mean NLL over all
    of them, so it does not depend on ``batch_size`` (default: :func:`auto_batch_size`).
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T) with T >= 2, got {tuple(windows.shape)}")
    batch_size = batch_size or auto_batch_size(model, windows.shape[1])
    if max_windows is not None:
        windows = windows[:max_windows]
    was_training = model.training
    model.eval()
    total, count = 0.0, windows.shape[0]
    try:
        for start in range(0, count, batch_size):
            total += float(window_nll(model, windows[start:start + batch_size]).sum())
            if progress is not None:
                progress(min(start + batch_size, count), count)
    finally:
        model.train(was_training)
    tokens = count * (windows.shape[1] - 1)
    mean = total / tokens
    return PerplexityResult(corpus, math.exp(mean), windows.shape[1], count, tokens, mean)


def evaluate_corpora(model: nn.Module, tokenizer, corpora: Sequence[str], *, seq_len: int = 512,
                     max_windows: int | None = None, batch_size: int | None = None,
                     progress: Callable[[str, int, int], None] | None = None
                     ) -> list[PerplexityResult]:
    """One :class:`PerplexityResult` per corpus, on its evaluation part."""
    results = []
    for name in corpora:
        windows = evaluation_windows(tokenizer, name, seq_len, max_windows)
        report = None if progress is None else (lambda d, t, n=name: progress(n, d, t))
        results.append(perplexity(model, windows, corpus=name, batch_size=batch_size,
                                  progress=report))
    return results
