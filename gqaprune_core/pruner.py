"""Choose units with a scoring method and cut them: one-shot or sequential, plus the anti-example.

- ``one-shot``: one gradient computation scores every layer, then all layers are cut.
- ``sequential`` (the original): layers are scored and cut one at a time, first to last; the
  gradients for layer i are recomputed on the model whose earlier layers are already pruned
  (and frozen: only layer i requires grad).
- ``naive-heads`` (unit method): query heads kept by their own Taylor score and KV heads by
  theirs, then matched *by position*. This is what breaks GQA models (query heads end up reading
  another head's keys and values); it exists to show the damage, never to use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from gqaprune_core.models import LayerLayout, decoder_layers, layout
from gqaprune_core.plan import LayerPlan, PruningPlan, identity_plan, top_k
from gqaprune_core.surgery import apply_plan_, cut_layer_, sync_config_, validate
from gqaprune_core.unit_importance import (LayerSaliency, channel_scores, group_scores,
                                           kv_head_scores, layer_saliency, query_head_scores)

Mode = Literal["sequential", "one-shot"]
UnitImportance = Literal["taylor", "magnitude", "activation", "random", "naive-heads"]
Progress = Callable[[int, int], None]


def layer_plan_from_saliency(shape: LayerLayout, saliency: LayerSaliency, groups: int,
                             channels: int, naive_heads: bool = False) -> LayerPlan:
    """Keep the best ``groups`` groups and ``channels`` channels of one layer. Pure."""
    kept_channels = (tuple(range(shape.mlp_width)) if channels == shape.mlp_width
                     else top_k(channel_scores(saliency), channels))
    kept_q = None
    if groups == shape.kv_heads:
        kept_groups = tuple(range(shape.kv_heads))
    elif naive_heads:
        kept_groups = top_k(kv_head_scores(saliency, shape.head_dim), groups)
        kept_q = top_k(query_head_scores(saliency, shape.head_dim), groups * shape.q_per_kv)
    else:
        kept_groups = top_k(group_scores(saliency, shape.q_per_kv, shape.head_dim), groups)
    return LayerPlan(shape.layer, shape.q_heads, shape.kv_heads, shape.head_dim, shape.mlp_width,
                     kept_groups, kept_channels, kept_q)


def _check_counts(shapes: Sequence[LayerLayout], groups: Sequence[int], channels: Sequence[int]):
    if len(groups) != len(shapes) or len(channels) != len(shapes):
        raise ValueError(f"need unit counts for {len(shapes)} layers, got {len(groups)} group "
                         f"and {len(channels)} channel counts")
    for s, g, c in zip(shapes, groups, channels):
        if not (1 <= g <= s.kv_heads and 1 <= c <= s.mlp_width):
            raise ValueError(f"layer {s.layer}: cannot keep {g} of {s.kv_heads} groups and {c} of "
                             f"{s.mlp_width} channels")


def prune_model_(model: nn.Module, calibration: torch.Tensor | None, groups_to_keep: Sequence[int],
                 channels_to_keep: Sequence[int], unit_importance: UnitImportance = "taylor",
                 mode: Mode = "sequential", seed: int = 0, chunk_size: int = 10,
                 progress: Progress | None = None) -> PruningPlan:
    """Score units, keep ``groups_to_keep[l]`` groups and ``channels_to_keep[l]`` channels of each
    layer, and cut the model in place.

    Args:
        calibration: (N, T) token ids for gradient or activation methods.
        progress: called as ``(layers_done, layers_to_prune)``.

    Returns:
        The plan that was applied; its indices refer to the model as it was before.
    """
    shapes = layout(model)
    _check_counts(shapes, groups_to_keep, channels_to_keep)
    naive = unit_importance == "naive-heads"
    method = "taylor" if naive else unit_importance
    if method in ("taylor", "activation") and calibration is None:
        raise ValueError(f"unit importance {unit_importance!r} needs calibration batches")
    todo = [s.layer for s, g, c in zip(shapes, groups_to_keep, channels_to_keep)
            if g < s.kv_heads or c < s.mlp_width]
    plan = identity_plan(shapes, unit_importance)
    plan = PruningPlan(plan.layers, unit_importance, {"mode": mode})
    if not todo:  # nothing to cut: no scoring pass
        return plan
    if mode == "one-shot":
        saliency = layer_saliency(model, method, calibration, todo, seed, chunk_size)
        for done, index in enumerate(todo):
            plan = plan.with_layer(layer_plan_from_saliency(
                shapes[index], saliency[index], groups_to_keep[index], channels_to_keep[index],
                naive))
            if progress is not None:
                progress(done + 1, len(todo))
        apply_plan_(model, plan)
        return plan
    if mode != "sequential":
        raise ValueError(f"unknown mode {mode!r}; choose 'sequential' or 'one-shot'")
    layers = decoder_layers(model)
    for done, index in enumerate(todo):
        saliency = layer_saliency(model, method, calibration, [index], seed, chunk_size)[index]
        layer_plan = layer_plan_from_saliency(shapes[index], saliency, groups_to_keep[index],
                                              channels_to_keep[index], naive)
        cut_layer_(layers[index], layer_plan)
        plan = plan.with_layer(layer_plan)
        if progress is not None:
            progress(done + 1, len(todo))
    sync_config_(model)
    validate(model)
    return plan
