"""The joint probe: one whole schedule cut and measured while the profile is made, so that
the predictor can scale its additive sum by how single-layer losses compound.

Notation: L layers, I MLP width, r the probe rate.

Single-layer losses need not add up: cut together, each layer re-fit on what the layers cut
before it produce, the model can lose more than the sum (damage compounds) or less (each
re-fit corrects some earlier damage); on the demo model the probe measured 0.87x the sum
(BENCHMARKS.md, "Sensitivity and prediction"). The probe measures that factor for the model
at hand: every layer loses ``round(r * I)`` MLP
channels, chosen by output energy and re-fit on the fit windows *as the probe's own earlier
cuts change them* (as the pipeline's sequential re-fit does, with its ``refit_feedback``: then
a third stream carries the fit windows through the layers uncut, the dense model the re-fit
steers back toward), and the profile windows run through all L cut layers at once. The
profile stores the measured loss increase; the predictor divides it by its own additive sum
for the same schedule (:func:`gqaprune_core.sensitivity.predict.compounding`).

It walks the layers with the profile: :meth:`JointProbe.step` is called with layer l after
layer l-1, cuts a copy of it, and advances the probe's fit and profile streams through that
copy; a layer's copy is dropped once both streams have passed it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gqaprune_core.layer_calls import LayerCall
from gqaprune_core.layerwise.prune import LayerCut, prune_layer_
from gqaprune_core.layerwise.stream import embed
from gqaprune_core.models import LayerLayout

PROBE_MLP_RATE = 0.3  # near what a 20 % cut of all parameters takes from the MLPs


class JointProbe:
    """The probe's two streams: the fit windows (re-fit statistics) and the profile windows
    (the measured loss), both through the layers cut so far."""

    def __init__(self, model: nn.Module, fit: torch.Tensor, first_call: LayerCall, rate: float,
                 ridge: float, batch_size: int, feedback: float = 0.0) -> None:
        device = next(model.parameters()).device
        self.fit = embed(model, fit, batch_size, device, store=device)
        # the fit windows through the layers uncut (only with feedback; the layer-wise path's
        # dense stream): the tensors are shared until the first layer replaces them
        self.dense = list(self.fit.hidden) if feedback else None
        self.hidden = first_call.hidden
        self.rate, self.ridge, self.feedback = rate, ridge, feedback

    @torch.no_grad()
    def step(self, shape: LayerLayout, layer: nn.Module, call: LayerCall) -> None:
        """Cut a copy of ``layer`` (the probe's rate of its MLP channels, energy and re-fit on
        the probe's fit stream) and advance the streams through it."""
        keep = shape.mlp_width - round(self.rate * shape.mlp_width)
        variant = copy.deepcopy(layer)
        cut = LayerCut(shape.kv_heads, keep, "magnitude", compensate=True, ridge=self.ridge,
                       feedback=self.feedback)
        # cuts (nothing when keep is the whole width) and advances the fit and dense streams
        prune_layer_(variant, shape, cut, self.fit, self.dense)
        self.hidden = call.run(variant, self.hidden)
