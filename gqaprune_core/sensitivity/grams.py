"""The Gram matrices a sensitivity profile reads, one decoder layer at a time.

Notation: I MLP width, H*D o_proj input width, N fit windows, B profile windows.

A profile needs, per layer, ``hᵀh`` of the MLP activations on the fit windows (channel choice
and re-fit, float64) and on the profile windows (the local output change of every grid point,
float32), and ``xᵀx`` of ``o_proj``'s input on the profile windows. Held for all layers at
once these dominate memory on large models (Llama-3-8B: 32 x 14,336² x (8 + 4) B = 79 GB), so
they are made per layer while the profile walks the layers: the fit windows' hidden states
advance through one layer at a time (:class:`gqaprune_core.layerwise.stream.HiddenBatches`,
the same batches and layer calls as a whole-model pass, so the same numbers), and the profile
windows' Grams come from re-running the layer on its recorded input.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gqaprune_core.compensate import mlp_activations
from gqaprune_core.layer_calls import LayerCall
from gqaprune_core.layerwise.stream import embed
from gqaprune_core.models import decoder_layers


def _add_gram(store: dict, key: str, rows: torch.Tensor, dtype: torch.dtype) -> None:
    """``store[key] += rowsᵀ rows`` (float32 product, summed in ``dtype``)."""
    gram = (rows.T @ rows).to(dtype)
    if key in store:
        store[key] += gram
    else:
        store[key] = gram


@torch.no_grad()
def fit_grams(model: nn.Module, windows: torch.Tensor, batch_size: int = 8
              ) -> Iterator[torch.Tensor]:
    """Per decoder layer, in order, the (I, I) float64 Gram of the dense model's MLP activations
    on ``windows`` (N, T), in batches of ``batch_size`` windows.

    A generator: only the current layer's Gram and the windows' hidden states before that
    layer are held (``dict(enumerate(fit_grams(...)))`` gives them all)."""
    device = next(model.parameters()).device
    batches = embed(model, windows, batch_size, device, store=device)
    for layer in decoder_layers(model):
        store: dict[str, torch.Tensor] = {}
        handle = layer.mlp.register_forward_pre_hook(
            lambda module, args, store=store: _add_gram(
                store, "mlp", mlp_activations(module, args[0], torch.float32), torch.float64))
        try:
            batches.advance(layer)
        finally:
            handle.remove()
        yield store.pop("mlp")


@torch.no_grad()
def held_grams(layer: nn.Module, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 Grams of ``layer``'s MLP activations (I, I) and o_proj input (H*D, H*D) on
    the profile windows, from re-running the layer on its recorded ``call``."""
    store: dict[str, torch.Tensor] = {}
    handles = [
        layer.mlp.register_forward_pre_hook(
            lambda module, args: _add_gram(
                store, "mlp", mlp_activations(module, args[0], torch.float32), torch.float32)),
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda module, args: _add_gram(store, "attn", args[0].reshape(
                -1, args[0].shape[-1]).float(), torch.float32))]
    try:
        call.run(layer, call.hidden)
    finally:
        for handle in handles:
            handle.remove()
    return store["mlp"], store["attn"]
