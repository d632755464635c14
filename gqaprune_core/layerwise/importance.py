"""Layer scores in one streamed pass: each layer loaded once, over all calibration batches.

Notation: L layers, N windows of T tokens, B windows per batch, E hidden size.

The same scores as :func:`gqaprune_core.layer_importance.compute_layer_importance`, higher = more
important, with the same per-batch float64 sums (so equal up to float rounding):

- ``block_influence``: mean over tokens of 1 - cos(layer input, layer output);
- ``activation``: mean over tokens of the L2 norm of the layer output;
- ``removal``: perplexity with the layer bypassed minus the base perplexity. Bypassing layer i
  starts a copy of the hidden states at layer i's input that every later layer also runs over,
  so layer j runs over j + 1 streams: the same ~L²/2 layer evaluations as the in-memory
  prefix reuse, with up to L copies of the (N, T, E) hidden states on the store device.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from gqaprune_core.evaluate import nll_from_hidden
from gqaprune_core.layer_importance import METHODS, LayerImportance
from gqaprune_core.layerwise.source import ModelSource
from gqaprune_core.layerwise.stream import HiddenBatches, OnStep, embed, layers_in_turn


def _statistics(scores: list[float]) -> dict:
    values = torch.tensor(scores, dtype=torch.float64)
    return {"mean": float(values.mean()), "std": float(values.std(unbiased=False)),
            "min": float(values.min()), "max": float(values.max())}


def _token_means(model: nn.Module, source: ModelSource, batches: HiddenBatches,
                 method: str, dtype: torch.dtype, on_step: OnStep | None) -> list[float]:
    sums = []
    for _, layer in layers_in_turn(model, source, batches.device, dtype, "importance", on_step):
        total = 0.0
        for index, before in enumerate(batches.hidden):
            out = batches.run(layer, index)
            if method == "activation":
                per_token = torch.linalg.vector_norm(out.float(), dim=-1)
            else:
                inp = before.to(out.device).float()
                per_token = 1.0 - F.cosine_similarity(inp, out.float(), dim=-1)
            total += float(per_token.double().sum())
            batches.hidden[index] = out.to(before.device)
        sums.append(total)
    tokens = sum(ids.numel() for ids in batches.ids)
    return [s / tokens for s in sums]


def _nll_total(model: nn.Module, batches: HiddenBatches, hidden: list[torch.Tensor]) -> float:
    return sum(float(nll_from_hidden(model, h.to(batches.device), ids, normalized=False).sum())
               for h, ids in zip(hidden, batches.ids))


def _removal(model: nn.Module, source: ModelSource, batches: HiddenBatches,
             dtype: torch.dtype, on_step: OnStep | None) -> tuple[list[float], dict]:
    bypassed: list[list[torch.Tensor]] = []  # per skipped layer: its hidden stream
    for _, layer in layers_in_turn(model, source, batches.device, dtype, "importance", on_step):
        for stream in bypassed:
            for b, hidden in enumerate(stream):
                stream[b] = batches.run(layer, b, hidden).to(hidden.device)
        bypassed.append(list(batches.hidden))  # skipping this layer: its input goes on
        batches.advance(layer)
    tokens = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches.ids)
    base_ppl = math.exp(_nll_total(model, batches, batches.hidden) / tokens)
    layer_ppl = [math.exp(_nll_total(model, batches, stream) / tokens) for stream in bypassed]
    return [p - base_ppl for p in layer_ppl], {"base_ppl": base_ppl, "layer_ppl": layer_ppl}


@torch.no_grad()
def streamed_importance(model: nn.Module, source: ModelSource, calibration: torch.Tensor,
                        method: str, device: torch.device, dtype: torch.dtype,
                        batch_size: int = 8, on_step: OnStep | None = None,
                        inputs: dict | None = None) -> LayerImportance:
    """L layer scores of the model in ``source`` on ``calibration`` (N, T) token ids.

    ``model`` is the skeleton from :func:`gqaprune_core.layerwise.source.open_model` (its
    layers are loaded one at a time and released again). ``inputs`` is stored in the result.
    """
    if method not in METHODS:
        raise ValueError(f"unknown layer importance method {method!r}; choose one of {METHODS}")
    start = time.perf_counter()
    batches = embed(model, calibration, batch_size, device)
    if method == "removal":
        scores, statistics = _removal(model, source, batches, dtype, on_step)
    else:
        scores, statistics = _token_means(model, source, batches, method, dtype, on_step), {}
    statistics |= _statistics(scores)
    return LayerImportance(method, tuple(scores), dict(inputs or {}), statistics,
                           time.perf_counter() - start)
