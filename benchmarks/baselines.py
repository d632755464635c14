"""Baseline methods that are not part of gqaprune, for the benchmarks only.

- :func:`global_taylor_plan`: rank every GQA group and MLP channel of the model together by
  Taylor score per parameter and remove the lowest until the budget (no per-layer rates).
- :func:`depth_prune_`: ShortGPT-style removal of whole decoder layers with the lowest block
  influence, then uniform Taylor MLP channels to land on the exact parameter budget.
- :func:`naive_removal_importance`: layer removal importance with one full forward pass per
  bypassed layer, the straightforward loop that the library's prefix reuse replaces (for the
  speed comparison; the scores are the same).

Notation: L layers, G KV groups per layer, I MLP width, N windows of T tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from gqaprune_core.evaluate import window_nll
from gqaprune_core.models import count_parameters, decoder_layers, layout
from gqaprune_core.plan import PruningPlan, build_plan
from gqaprune_core.pruner import prune_model_
from gqaprune_core.schedule import unit_costs
from gqaprune_core.surgery import validate
from gqaprune_core.unit_importance import channel_scores, group_scores, layer_saliency


# ---------------------------------------------------------------------------------------------
# global Taylor ranking


def global_unit_counts(group_values: Sequence[torch.Tensor], channel_values: Sequence[torch.Tensor],
                       group_costs: Sequence[int], channel_costs: Sequence[int],
                       params_to_remove: int) -> tuple[list[int], list[int]]:
    """Groups and channels to *remove* per layer when all units compete in one ranking.

    Units are taken in increasing ``score / cost`` order and removed while they fit in what is
    left of ``params_to_remove``; a unit that would overshoot is skipped, so the cheap channels
    ranked after it fill the rest (the result misses the budget by less than one channel).
    Every layer keeps at least one group and one channel. Pure.
    """
    units = []  # (score per parameter, layer, is_group, cost)
    for layer, (gs, cs) in enumerate(zip(group_values, channel_values)):
        units += [(float(v) / group_costs[layer], layer, True, group_costs[layer]) for v in gs]
        units += [(float(v) / channel_costs[layer], layer, False, channel_costs[layer])
                  for v in cs]
    units.sort(key=lambda unit: unit[0])
    groups = [0] * len(group_values)
    channels = [0] * len(group_values)
    left = params_to_remove
    for _, layer, is_group, cost in units:
        if cost > left:
            continue
        counts, limit = ((groups, group_values[layer].numel()) if is_group
                         else (channels, channel_values[layer].numel()))
        if counts[layer] + 1 >= limit:  # keep >= 1 unit of each kind per layer
            continue
        counts[layer] += 1
        left -= cost
    return groups, channels


def global_taylor_plan(model: nn.Module, calibration: torch.Tensor, params_to_remove: int,
                       seed: int = 0) -> PruningPlan:
    """A plan removing about ``params_to_remove`` parameters by one global Taylor ranking.

    Taylor saliency comes from one gradient pass over ``calibration`` (N, T) for all layers
    (one-shot). Within a layer a group's cost is fixed, so the global order restricted to one
    layer is that layer's own score order: the global ranking decides only how many units each
    layer loses, and :func:`build_plan` picks which.
    """
    shapes = layout(model)
    costs = unit_costs(model)
    saliency = layer_saliency(model, "taylor", calibration, None, seed)
    g_values = [group_scores(saliency[s.layer], s.q_per_kv, s.head_dim) for s in shapes]
    c_values = [channel_scores(saliency[s.layer]) for s in shapes]
    groups, channels = global_unit_counts(g_values, c_values, [c.group for c in costs],
                                          [c.channel for c in costs], params_to_remove)
    return build_plan(shapes, g_values, c_values,
                      [s.kv_heads - g for s, g in zip(shapes, groups)],
                      [s.mlp_width - c for s, c in zip(shapes, channels)], "global_taylor")


# ---------------------------------------------------------------------------------------------
# depth pruning


def remove_layers_(model: nn.Module, layers: Sequence[int]) -> None:
    """Delete the given decoder layers in place and renumber the rest.

    The KV cache finds a layer's slot through ``self_attn.layer_idx`` and sizes itself from the
    config, so both are rewritten; ``layer_types`` (sliding / full attention, in newer configs)
    follows the kept layers.
    """
    old = decoder_layers(model)
    drop = set(layers)
    if not drop <= set(range(len(old))) or len(drop) >= len(old):
        raise ValueError(f"cannot remove layers {sorted(drop)} of a model with {len(old)} layers")
    keep = [i for i in range(len(old)) if i not in drop]
    model.model.layers = nn.ModuleList([old[i] for i in keep])
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]


def layer_parameters(model: nn.Module, index: int) -> int:
    return count_parameters(decoder_layers(model)[index])


def spread_channels(total: int, order: Sequence[int], layers: int) -> list[int]:
    """``total`` channels to remove over ``layers`` layers as evenly as possible; the remainder
    goes one each to the layers first in ``order``. Pure."""
    base, extra = divmod(total, layers)
    counts = [base] * layers
    for layer in list(order)[:extra]:
        counts[layer] += 1
    return counts


def depth_prune_(model: nn.Module, layer_scores: Sequence[float], calibration: torch.Tensor,
                 params_to_remove: int, seed: int = 0) -> dict:
    """Remove the lowest-scoring whole layers while they fit in ``params_to_remove``, then the
    rest of the budget as uniform Taylor MLP channels (one-shot) in the remaining layers.

    Args:
        layer_scores: L scores, higher = more important (block influence for ShortGPT).
        calibration: (N, T) ids for the Taylor channel scores.

    Returns:
        ``{"removed_layers": [...], "channels_removed_per_layer": [...]}`` (the latter indexed
        by the layers that remain).
    """
    count = len(decoder_layers(model))
    if len(layer_scores) != count:
        raise ValueError(f"got {len(layer_scores)} layer scores for {count} layers")
    order = sorted(range(count), key=lambda i: layer_scores[i])
    removed, left = [], params_to_remove
    for index in order:
        cost = layer_parameters(model, index)
        if cost > left or len(removed) == count - 1:
            break
        removed.append(index)
        left -= cost
    if removed:
        remove_layers_(model, removed)
    shapes = layout(model)
    costs = unit_costs(model)
    channel_cost = costs[0].channel
    kept = [i for i in range(count) if i not in removed]
    least_important_first = sorted(range(len(kept)), key=lambda i: layer_scores[kept[i]])
    channels = spread_channels(round(left / channel_cost), least_important_first, len(shapes))
    too_many = [s.layer for s, c in zip(shapes, channels) if c >= s.mlp_width]
    if too_many:
        raise ValueError(f"layers {too_many} would lose all MLP channels: budget too large")
    if any(channels):
        prune_model_(model, calibration, [s.kv_heads for s in shapes],
                     [s.mlp_width - c for s, c in zip(shapes, channels)], "taylor", "one-shot",
                     seed)
    else:
        validate(model)
    return {"removed_layers": sorted(removed), "channels_removed_per_layer": channels}


# ---------------------------------------------------------------------------------------------
# removal importance without prefix reuse


class _Bypass(nn.Module):
    """Stands in for a decoder layer and passes its hidden input on unchanged."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


def _batch_nll(model: nn.Module, ids: torch.Tensor) -> float:
    # the library's NLL (chunked LM head), so both variants sum in the same float order
    return float(window_nll(model, ids).sum())


@torch.no_grad()
def naive_removal_importance(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8,
                             progress: Callable[[int, int], None] | None = None
                             ) -> tuple[list[float], dict]:
    """Removal importance the plain way: for every layer, swap it for a bypass and run the whole
    model again (L + 1 full forward passes per batch, against about L/2 + 1 with prefix reuse).

    Same batches, float32 NLL summed in float64 and the same score definition (perplexity with
    the layer bypassed minus the base perplexity) as
    :func:`gqaprune_core.layer_importance.compute_layer_importance`, so the two agree up to
    floating-point reordering.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in calibration.split(batch_size)]
    returns_tuple = []
    hook = layers[0].register_forward_hook(
        lambda module, args, output: returns_tuple.append(isinstance(output, tuple)))
    was_training = model.training
    model.eval()
    base_total, totals = 0.0, [0.0] * len(layers)
    try:
        for done, ids in enumerate(batches):
            base_total += _batch_nll(model, ids)
            hook.remove()
            for index in range(len(layers)):
                original = layers[index]
                layers[index] = _Bypass(returns_tuple[0])
                try:
                    totals[index] += _batch_nll(model, ids)
                finally:
                    layers[index] = original
            if progress is not None:
                progress(done + 1, len(batches))
    finally:
        hook.remove()
        model.train(was_training)
    tokens = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)
    base_ppl = math.exp(base_total / tokens)
    layer_ppl = [math.exp(t / tokens) for t in totals]
    return [p - base_ppl for p in layer_ppl], {"base_ppl": base_ppl, "layer_ppl": layer_ppl}
