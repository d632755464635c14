"""Running decoder layers by hand, as the model called them: one forward pass records every
layer's hidden input and the other arguments the model passed it (attention mask, rotary
position embeddings, ...), and a recorded call re-runs its layer (or a cut copy of it) on other
hidden states. The hidden state entering layer i does not depend on later layers, so layer
scores (:mod:`gqaprune_core.layer_importance`) and the sensitivity profile
(:mod:`gqaprune_core.sensitivity`) restart from layer i without recomputing layers 0..i-1; the
same code serves Llama, Mistral and Qwen2.

Notation: B windows of T tokens, E hidden size, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gqaprune_core.models import decoder_layers, layer_output


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class LayerCall:
    """How the model called one decoder layer: the hidden input and every other argument."""

    hidden: torch.Tensor  # (B, T, E)
    args: tuple
    kwargs: dict

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Call ``layer`` as the model did, on ``hidden`` instead of the recorded input."""
        if self.args:
            return layer_output(layer(hidden, *self.args[1:], **self.kwargs))
        return layer_output(layer(**(self.kwargs | {"hidden_states": hidden})))


def record_calls(model: nn.Module, ids: torch.Tensor) -> tuple[list[LayerCall], torch.Tensor]:
    """One pass of ``ids`` (B, T) through the decoder recording every layer's call; returns the L
    calls and the final (normalized) hidden states (B, T, E). The hooks are removed even if the
    pass fails."""
    calls: list[LayerCall | None] = [None] * len(decoder_layers(model))

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[index] = LayerCall(hidden_input(args, kwargs), args, dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    try:
        final = model.model(ids, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, call in enumerate(calls) if call is None]
    if missing:
        raise RuntimeError(f"decoder layers {missing} were not called by the model's forward")
    return calls, final  # type: ignore[return-value]
