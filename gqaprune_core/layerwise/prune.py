"""Cut one decoder layer on the device: GQA groups by weights, MLP channels with re-fit.

Notation: N windows of T tokens, B windows per batch, E hidden size, G KV groups, I MLP width.

The in-memory path (:func:`gqaprune_core.pipeline.run_pipeline`) first cuts the attention of
every layer, then runs :func:`gqaprune_core.compensate.prune_mlp_compensated_`, whose hooks fit
each MLP on the inputs the *already pruned* earlier layers produce. Layer by layer that is:

1. groups: ``magnitude`` or ``random`` scores of this layer's weights (layer-local, so one-shot
   and sequential agree); without compensation the MLP channels are chosen the same way;
2. with compensation: over all calibration batches, accumulate the Gram matrix ``C = hᵀh`` of
   the full MLP activations (N·T x I, float64), and with ``feedback`` β the drift
   ``hᵀ (r + m - r̃ - h Wᵀ)`` against the dense stream (attention cut, MLP whole, as the
   in-memory path's ``dense_residuals``); keep the channels of largest output energy (or
   energy and Fisher shares, from :mod:`gqaprune_core.layerwise.fisher`), re-fit ``down_proj``
   (:func:`gqaprune_core.compensate.refit_down`), cut;
3. run the cut layer over the batches: its outputs are the next layer's inputs.

Sums over batches instead of one batch of N windows: equal up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gqaprune_core.compensate import channel_energy, mlp_activations, refit_down, select_scores
from gqaprune_core.layerwise.stream import HiddenBatches, trim_heap
from gqaprune_core.models import LayerLayout
from gqaprune_core.plan import LayerPlan, top_k
from gqaprune_core.pruner import layer_plan_from_saliency
from gqaprune_core.surgery import cut_layer_
from gqaprune_core.unit_importance import magnitude_saliency, random_saliency

LAYER_LOCAL_UNIT_METHODS = ("magnitude", "random")


@dataclass(frozen=True)
class LayerCut:
    """How to cut one layer: units to keep and how to choose them."""

    groups: int  # KV groups to keep
    channels: int  # MLP channels to keep
    unit_importance: str  # "magnitude" or "random" (when units are chosen by scores)
    compensate: bool
    ridge: float = 0.1
    feedback: float = 0.0
    seed: int = 0
    selection: str = "energy"  # how MLP channels are kept (compensate.select_scores)


class _StopLayer(Exception):
    """Ends a layer's forward once the MLP input has been seen (its output is not needed)."""


def by_scores(layer: nn.Module, shape: LayerLayout, cut: LayerCut) -> LayerPlan:
    """Groups (and, without compensation, channels) chosen by layer-local scores."""
    channels = shape.mlp_width if cut.compensate else cut.channels
    if cut.groups == shape.kv_heads and channels == shape.mlp_width:
        return LayerPlan(shape.layer, shape.q_heads, shape.kv_heads, shape.head_dim,
                         shape.mlp_width, tuple(range(shape.kv_heads)),
                         tuple(range(shape.mlp_width)))
    if cut.unit_importance == "magnitude":
        saliency = magnitude_saliency(layer)
    elif cut.unit_importance == "random":
        saliency = random_saliency(layer, cut.seed, shape.layer)
    else:
        raise ValueError(f"unit importance {cut.unit_importance!r} cannot choose units layer by "
                         f"layer; use one of {LAYER_LOCAL_UNIT_METHODS}")
    return layer_plan_from_saliency(shape, saliency, cut.groups, channels)


def _statistics(layer: nn.Module, batches: HiddenBatches, dense: list[torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(I, I) Gram matrix of the MLP activations over all batches and, with ``dense`` (the
    dense stream's outputs of this layer, per batch), the (I, E) drift; float64."""
    mlp, state = layer.mlp, {}
    gram, drift = None, None

    def norm_hook(module: nn.Module, args: tuple) -> None:
        state["before"] = args[0].reshape(-1, args[0].shape[-1])

    def mlp_hook(module: nn.Module, args: tuple) -> None:
        nonlocal gram, drift
        h = mlp_activations(mlp, args[0])
        gram = h.T @ h if gram is None else gram.addmm_(h.T, h)  # in place: one (I, I) at a time
        if dense is not None:
            target = dense[state["batch"]].to(h.device).reshape(-1, dense[0].shape[-1])
            missing = (target.double() - state.pop("before").double()
                       - h @ mlp.down_proj.weight.double().T)
            drift = h.T @ missing if drift is None else drift.addmm_(h.T, missing)
        raise _StopLayer

    handles = [mlp.register_forward_pre_hook(mlp_hook)]
    if dense is not None:
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(norm_hook))
    try:
        for index in range(len(batches.hidden)):
            state["batch"] = index
            try:
                batches.run(layer, index)
            except _StopLayer:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return gram, drift


def _refit_mlp_(layer: nn.Module, shape: LayerLayout, plan: LayerPlan, cut: LayerCut,
                batches: HiddenBatches, dense: list[torch.Tensor] | None,
                fisher: torch.Tensor | None) -> LayerPlan:
    """Choose channels (by ``cut.selection``), re-fit down_proj, cut; returns the layer's
    plan."""
    gram, drift = _statistics(layer, batches, dense)
    trim_heap()  # that pass's activations leave heap holes the re-fit's large blocks cannot use
    down = layer.mlp.down_proj.weight
    kept = top_k(select_scores(cut.selection, channel_energy(gram, down), fisher), cut.channels)
    new_down = refit_down(gram, down, kept, cut.ridge, drift, cut.feedback, overwrite_gram=True)
    del gram, drift
    heads_now = len(plan.kept_kv_heads)
    mlp_only = LayerPlan(shape.layer, heads_now * shape.q_per_kv, heads_now, shape.head_dim,
                         shape.mlp_width, tuple(range(heads_now)), kept)
    cut_layer_(layer, mlp_only)
    layer.mlp.down_proj.weight.data.copy_(new_down)
    return LayerPlan(plan.layer, plan.q_heads_before, plan.kv_heads_before, plan.head_dim,
                     plan.mlp_before, plan.kept_kv_heads, kept)


@torch.no_grad()
def prune_layer_(layer: nn.Module, shape: LayerLayout, cut: LayerCut, batches: HiddenBatches,
                 dense: list[torch.Tensor] | None = None, fisher: torch.Tensor | None = None
                 ) -> LayerPlan:
    """Cut ``layer`` in place and advance ``batches`` (and ``dense``) through it.

    Args:
        shape: the layer's shapes before the cut.
        batches: the pruned model's hidden states entering this layer; replaced by the cut
            layer's outputs.
        dense: with ``cut.feedback`` > 0, the dense stream entering this layer (attention cut
            as planned, every MLP whole); replaced by this layer's outputs before the MLP cut.
        fisher: the layer's (I,) Fisher channel scores when ``cut.selection`` asks for them
            (:func:`gqaprune_core.layerwise.fisher.streamed_fisher`).

    Returns:
        The layer's plan (indices refer to the layer before the cut).
    """
    plan = by_scores(layer, shape, cut)
    if not plan.is_identity:
        cut_layer_(layer, plan)
    dense_out = None
    if cut.feedback and dense is not None:
        dense_out = [batches.run(layer, b, hidden).to(hidden.device)
                     for b, hidden in enumerate(dense)]
    if cut.compensate and cut.channels < shape.mlp_width:
        plan = _refit_mlp_(layer, shape, plan, cut, batches, dense_out, fisher)
    if dense_out is not None:
        dense[:] = dense_out
    batches.advance(layer)
    return plan
