"""Per-layer pruning rates → whole units (GQA groups, MLP channels) per layer.

Notation: L layers, H query heads, G KV groups, D head_dim, I MLP width, E hidden size.

The rates come from :func:`gqaprune_core.rates.layer_rates` (one per layer, their
parameter-weighted mean exactly the target). :func:`allocate_units` turns them into whole
units. A GQA group is coarse (on the demo model one group is a third of a layer's attention,
8.3 % of the layer). Two roundings: ``"across"`` rounds group counts across layers (largest
remainder), so attention gives about its share of the budget; ``"per_layer"`` (the original
project's rule) removes ``floor(rate * groups)`` in each layer, so a layer loses a group only
once its rate reaches one group's share. Either way MLP channels (1,728 parameters each on the
demo model) absorb what the groups leave, so the parameters removed match the budget.

:func:`unit_costs` reads from a model's weights how many parameters one unit removes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from gqaprune_core.models import LayerLayout, decoder_layers, layout

GroupRounding = Literal["across", "per_layer"]
GROUP_ROUNDINGS: tuple[str, ...] = ("across", "per_layer")
BUDGET_TOLERANCE = 0.005  # |removed - budget| allowed, as a fraction of the prunable parameters


# ---------------------------------------------------------------------------------------------
# unit costs


@dataclass(frozen=True)
class UnitCost:
    """Parameters of one layer, read from its weights.

    ``group``: removed with one GQA group (q_per_kv*D rows of q_proj, D rows each of k_proj and
    v_proj, q_per_kv*D columns of o_proj, and the matching q/k/v bias entries).
    ``channel``: removed with one MLP channel (a row of gate_proj and up_proj, a column of
    down_proj, and gate/up bias entries if any). ``attention`` / ``mlp``: all parameters of the
    layer's q/k/v/o and gate/up/down projections (norms excluded).
    """

    group: int
    channel: int
    attention: int
    mlp: int


def _numel(linear: nn.Linear) -> int:
    return linear.weight.numel() + (0 if linear.bias is None else linear.bias.numel())


def _bias_of(linear: nn.Linear, rows: int) -> int:
    return 0 if linear.bias is None else rows


def unit_costs(model: nn.Module) -> list[UnitCost]:
    """One :class:`UnitCost` per decoder layer (L entries), from the current weights.

    On SmolLM2-135M (E=576, D=64, q_per_kv=3): group = 2*3*64*576 + 2*64*576 = 294,912 and
    channel = 3*576 = 1,728.
    """
    costs = []
    for shape, layer in zip(layout(model), decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        q_rows, kv_rows = shape.q_per_kv * shape.head_dim, shape.head_dim
        group = (q_rows * attn.q_proj.weight.shape[1] + _bias_of(attn.q_proj, q_rows)
                 + kv_rows * attn.k_proj.weight.shape[1] + _bias_of(attn.k_proj, kv_rows)
                 + kv_rows * attn.v_proj.weight.shape[1] + _bias_of(attn.v_proj, kv_rows)
                 + q_rows * attn.o_proj.weight.shape[0])
        channel = (mlp.gate_proj.weight.shape[1] + _bias_of(mlp.gate_proj, 1)
                   + mlp.up_proj.weight.shape[1] + _bias_of(mlp.up_proj, 1)
                   + mlp.down_proj.weight.shape[0])
        attention = sum(_numel(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        mlp_total = sum(_numel(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        costs.append(UnitCost(group, channel, attention, mlp_total))
    return costs


# ---------------------------------------------------------------------------------------------
# rates -> whole units


@dataclass(frozen=True)
class UnitAllocation:
    """How many whole units each layer keeps, and how well that meets the parameter budget.

    ``params_prunable``: parameters of the parts being pruned (attention and/or MLP, per the
    mode) of the layers with a positive rate, i.e. of the layers in range of
    :func:`layer_rates` whenever its target is > 0. ``params_budget``: sum over those layers of
    ``rate * prunable part``. ``ratio_requested = params_budget / params_prunable``, and
    ``ratio_achieved = params_removed / params_prunable`` (both 0.0 when nothing is prunable).
    ``budget_met``: whether ``|params_removed - params_budget|`` is within 0.5 % of
    ``params_prunable``; attention-only pruning, with its coarse groups, may miss it, and says
    so here instead of failing.
    """

    groups_to_keep: tuple[int, ...]
    channels_to_keep: tuple[int, ...]
    params_prunable: int
    params_budget: int
    params_removed: int
    ratio_requested: float
    ratio_achieved: float
    budget_met: bool


def _round_units(ideal: Sequence[float], cost: Sequence[int], cap: Sequence[int],
                 target: float, order_key: Sequence[float]) -> list[int]:
    """Whole unit counts near ``ideal`` (each within ``[0, cap_i]``) whose total cost is nearest
    to ``target`` parameters.

    Each layer gets ``floor(ideal_i)``; the parameters still missing are handed out one unit at a
    time, largest fractional remainder first (ties: smaller ``order_key``, then lower index),
    while a unit brings the total closer to ``target``.
    """
    counts = [min(int(math.floor(x)), c) for x, c in zip(ideal, cap)]
    missing = target - sum(n * u for n, u in zip(counts, cost))
    candidates = sorted((i for i in range(len(counts)) if counts[i] < cap[i]),
                        key=lambda i: (-round(ideal[i] - counts[i], 9), order_key[i], i))
    for i in candidates:
        if missing >= cost[i] / 2:
            counts[i] += 1
            missing -= cost[i]
    return counts


def _spread_remainder(amounts: list[float], capacity: Sequence[float], residual: float
                      ) -> list[float]:
    """Move ``residual`` parameters into ``amounts`` (each kept in ``[0, capacity_i]``), in
    proportion to each layer's room in that direction. Returns the new amounts."""
    room = [c - a for a, c in zip(amounts, capacity)] if residual > 0 else list(amounts)
    total_room = sum(room)
    if total_room <= 0:
        return amounts
    share = min(1.0, abs(residual) / total_room) * (1 if residual > 0 else -1)
    return [a + share * r for a, r in zip(amounts, room)]


def _channel_counts(budgets: Sequence[float], group_params: Sequence[int],
                    costs: Sequence[UnitCost], widths: Sequence[int],
                    order_key: Sequence[float], multiple: int = 1) -> list[int]:
    """Channels to remove per layer so each layer's removal approaches its budget, and the total
    matches the total budget: what a layer cannot absorb (already over budget from groups, or
    short of MLP) moves to the other layers. Channels go in blocks of ``multiple`` (which
    divides every width), so every layer keeps a multiple of it."""
    capacity = [(w - multiple) * c.channel for w, c in zip(widths, costs)]
    wanted = [b - g for b, g in zip(budgets, group_params)]
    amounts = [min(max(x, 0.0), cap) for x, cap in zip(wanted, capacity)]
    target = sum(wanted)
    amounts = _spread_remainder(amounts, capacity, target - sum(amounts))
    ideal = [a / (c.channel * multiple) for a, c in zip(amounts, costs)]
    caps = [(w - multiple) // multiple for w in widths]
    blocks = _round_units(ideal, [c.channel * multiple for c in costs], caps,
                          min(target, sum(capacity)), order_key)
    return [b * multiple for b in blocks]


def channel_block(widths: Sequence[int], multiple: int) -> int:
    """The block size actually used: the largest divisor of ``multiple`` that divides every
    MLP width (a model whose widths share no factor with it falls back to single channels)."""
    return math.gcd(multiple, *widths) if widths else multiple


def allocate_units(model_layout: Sequence[LayerLayout], costs: Sequence[UnitCost],
                   rates: Sequence[float], layer_scores: Sequence[float] | None = None,
                   prune_attention: bool = True, prune_mlp: bool = True,
                   group_rounding: GroupRounding = "across", channel_multiple: int = 1
                   ) -> UnitAllocation:
    """Whole GQA groups and MLP channels to keep per layer so that the parameters removed meet
    ``sum_l rate_l * prunable_l``.

    Each layer's budget is split between attention and MLP in proportion to their parameters.
    Group counts are rounded across layers (``group_rounding="across"``: largest remainder; ties
    go to the least important layer when ``layer_scores`` is given) or down in each layer
    (``"per_layer"``), every layer keeps >= 1 group and >= 1 channel, and
    channels take up what the groups leave, so with both parts pruned the total is met within
    0.5 % of the prunable parameters whenever the layers can give that much while keeping one
    group and one channel each (on the demo model: any rates up to 0.9).

    Args:
        model_layout: L layouts (see :func:`gqaprune_core.models.layout`).
        costs: L unit costs (see :func:`unit_costs`).
        rates: L rates in [0, 1), as from :func:`layer_rates`; 0 leaves a layer whole.
        layer_scores: L importance scores (higher = more important), for tie-breaking only.
        prune_attention, prune_mlp: which parts to prune (at least one).
        group_rounding: ``"across"`` or ``"per_layer"`` (see the module docstring). With
            attention alone pruned, ``"per_layer"`` usually misses the budget (``budget_met``).
        channel_multiple: every pruned layer keeps a multiple of this many MLP channels (of
            :func:`channel_block` of it, when it does not divide every width): GPU matrix
            kernels slow down on widths that are not multiples of 8.

    Raises:
        ValueError: lengths that differ from L, rates outside [0, 1), neither part pruned, or
            an unknown ``group_rounding``.
    """
    count = len(model_layout)
    scores = [0.0] * count if layer_scores is None else [float(s) for s in layer_scores]
    if not len(costs) == len(rates) == len(scores) == count:
        raise ValueError(f"need one cost, rate and score per layer: {count} layouts, "
                         f"{len(costs)} costs, {len(rates)} rates, {len(scores)} scores")
    bad = {i: r for i, r in enumerate(rates) if not 0.0 <= r < 1.0}
    if bad:
        raise ValueError(f"rates must lie in [0, 1); layer: rate = {bad}")
    if not (prune_attention or prune_mlp):
        raise ValueError("prune_attention and prune_mlp are both False: nothing to allocate")
    if channel_multiple < 1:
        raise ValueError(f"channel_multiple={channel_multiple} must be >= 1")
    if group_rounding not in GROUP_ROUNDINGS:
        raise ValueError(f"group_rounding={group_rounding!r}; choose one of "
                         f"{', '.join(GROUP_ROUNDINGS)}")
    active = [r > 0 for r in rates]
    parts = [(c.attention if prune_attention else 0) + (c.mlp if prune_mlp else 0) for c in costs]
    prunable = sum(p for p, on in zip(parts, active) if on)
    budgets = [r * p for r, p in zip(rates, parts)]
    groups = [0] * count
    if prune_attention:
        ideal = [min(r * c.attention / c.group, s.kv_heads - 1)
                 for r, c, s in zip(rates, costs, model_layout)]
        # With channels to take up the rest, groups aim at attention's share of the budget.
        group_target = (sum(i * c.group for i, c in zip(ideal, costs)) if prune_mlp
                        else sum(budgets))
        caps = [s.kv_heads - 1 if on else 0 for s, on in zip(model_layout, active)]
        if group_rounding == "per_layer":  # 1e-9: a rate of exactly one group's share counts
            groups = [min(int(math.floor(x + 1e-9)), c) for x, c in zip(ideal, caps)]
        else:
            groups = _round_units(ideal, [c.group for c in costs], caps, group_target, scores)
    channels = [0] * count
    if prune_mlp:
        widths = [s.mlp_width if on else 1 for s, on in zip(model_layout, active)]
        multiple = channel_block([w for w, on in zip(widths, active) if on], channel_multiple)
        widths = [w if on else multiple for w, on in zip(widths, active)]
        channels = _channel_counts(budgets, [g * c.group for g, c in zip(groups, costs)], costs,
                                   widths, scores, multiple)
    return _summary(model_layout, costs, groups, channels, prunable, sum(budgets))


def _summary(model_layout: Sequence[LayerLayout], costs: Sequence[UnitCost],
             groups_removed: Sequence[int], channels_removed: Sequence[int], prunable: int,
             budget: float) -> UnitAllocation:
    removed = sum(g * c.group + m * c.channel
                  for g, m, c in zip(groups_removed, channels_removed, costs))
    for s, g, m in zip(model_layout, groups_removed, channels_removed):
        assert 0 <= g < s.kv_heads and 0 <= m < s.mlp_width, (s, g, m)
    return UnitAllocation(
        groups_to_keep=tuple(s.kv_heads - g for s, g in zip(model_layout, groups_removed)),
        channels_to_keep=tuple(s.mlp_width - m for s, m in zip(model_layout, channels_removed)),
        params_prunable=prunable,
        params_budget=round(budget),
        params_removed=removed,
        ratio_requested=budget / prunable if prunable else 0.0,
        ratio_achieved=removed / prunable if prunable else 0.0,
        budget_met=abs(removed - budget) <= BUDGET_TOLERANCE * prunable,
    )
