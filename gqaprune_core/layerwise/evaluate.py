"""Perplexity layer by layer: the evaluation windows' hidden states stream through the layers.

Notation: N windows of T tokens, B windows per batch, E hidden size, V vocabulary.

Every corpus's windows are embedded first (hidden states on CPU), each decoder layer is loaded
once and run over all of them, then the final norm and the chunked LM head give the NLL
(:func:`gqaprune_core.evaluate.nll_from_hidden`). The result is a
:class:`gqaprune_core.evaluate.PerplexityResult`, equal to
:func:`gqaprune_core.evaluate.perplexity` of the whole model up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gqaprune_core.data import evaluation_windows
from gqaprune_core.evaluate import PerplexityResult, nll_from_hidden
from gqaprune_core.layerwise.source import ModelSource
from gqaprune_core.layerwise.stream import HiddenBatches, OnStep, embed, layers_in_turn


@torch.no_grad()
def streamed_perplexity(model: nn.Module, source: ModelSource, windows: Sequence[torch.Tensor],
                        device: torch.device, dtype: torch.dtype, *,
                        corpora: Sequence[str] | None = None, batch_size: int = 4,
                        on_step: OnStep | None = None, stage: str = "evaluate"
                        ) -> list[PerplexityResult]:
    """One perplexity per entry of ``windows`` (each (N, T) token ids), all streamed together.

    ``model`` is the skeleton of ``source`` (:func:`gqaprune_core.layerwise.source.open_model`).
    """
    names = list(corpora) if corpora is not None else [""] * len(windows)
    if len(names) != len(windows):
        raise ValueError(f"got {len(names)} corpus names for {len(windows)} window sets")
    streams: list[HiddenBatches] = [embed(model, w, batch_size, device) for w in windows]
    for _, layer in layers_in_turn(model, source, device, dtype, stage, on_step):
        for batches in streams:
            batches.advance(layer)
    results = []
    for name, batches, w in zip(names, streams, windows):
        total = sum(float(nll_from_hidden(model, hidden.to(device), ids, normalized=False).sum())
                    for hidden, ids in zip(batches.hidden, batches.ids))
        tokens = w.shape[0] * (w.shape[1] - 1)
        mean = total / tokens
        results.append(PerplexityResult(name, math.exp(mean), w.shape[1], w.shape[0], tokens,
                                        mean))
    return results


def streamed_corpora(model: nn.Module, source: ModelSource, tokenizer, corpora: Sequence[str],
                     device: torch.device, dtype: torch.dtype, *, seq_len: int = 512,
                     max_windows: int | None = None, batch_size: int = 4,
                     on_step: OnStep | None = None, stage: str = "evaluate"
                     ) -> list[PerplexityResult]:
    """Layer-wise :func:`gqaprune_core.evaluate.evaluate_corpora`: each corpus's evaluation
    part, in windows of ``seq_len`` tokens, at most ``max_windows`` per corpus."""
    windows = [evaluation_windows(tokenizer, name, seq_len, max_windows) for name in corpora]
    return streamed_perplexity(model, source, windows, device, dtype, corpora=corpora,
                               batch_size=batch_size, on_step=on_step, stage=stage)
