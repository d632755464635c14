"""The optimized schedule: per layer, the whole GQA groups and MLP channel blocks to remove so
that the predicted loss is smallest at exactly the requested parameter budget.

Notation: L layers, G KV groups, I MLP width, m = channel block (``channel_multiple``).

A knapsack over parameter cost, solved by dynamic programming: every layer in range offers the
options (g groups, c channels) with g in 0..G-1 (0 only without attention pruning) and c a
multiple of m up to the profile grid's last rate (90 % of I; 0 only without MLP pruning) and
at most ``max_rate`` of the layer's prunable parameters. An option costs ``g * group + c *
channel`` parameters (:func:`gqaprune_core.schedule.unit_costs`) and its predicted loss is
``group_loss + mlp_loss`` (:mod:`gqaprune_core.sensitivity.predict`). Costs are counted in units of the
greatest common divisor of all option costs (4,608 parameters on the demo model: a block of 8
channels is 3 units, a GQA group 64), so the DP is exact; it returns the least total loss among
the costs within half a channel block of the budget. If none is reachable (the layers cannot
give that much), a final pass adds or removes single channel blocks where they cost the least
loss. How the budget splits between
attention and MLP follows from the measured loss per parameter, not from a rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gqaprune_core.models import LayerLayout
from gqaprune_core.schedule import BUDGET_TOLERANCE, UnitAllocation, UnitCost, channel_block
from gqaprune_core.sensitivity.predict import group_loss, mlp_loss
from gqaprune_core.sensitivity.profile import SensitivityProfile

MAX_UNITS = 20_000  # DP cells; the demo model at 30 % needs 8,800 (unit 4,608 parameters)


@dataclass(frozen=True)
class _Option:
    groups: int
    channels: int
    params: int
    loss: float


def _options(profile: SensitivityProfile, shape: LayerLayout, cost: UnitCost, multiple: int,
             prune_attention: bool, prune_mlp: bool, max_rate: float) -> list[_Option]:
    layer = shape.layer
    part = (cost.attention if prune_attention else 0) + (cost.mlp if prune_mlp else 0)
    most_channels = int(profile.mlp_rates[-1] * shape.mlp_width) // multiple * multiple
    most_channels = min(most_channels, shape.mlp_width - multiple) if prune_mlp else 0
    group_range = range(shape.kv_heads if prune_attention else 1)
    options = []
    for groups in group_range:
        g_loss = group_loss(profile, layer, groups)[0]
        for channels in range(0, most_channels + 1, multiple):
            params = groups * cost.group + channels * cost.channel
            if params > max_rate * part + 1e-6:
                break
            options.append(_Option(groups, channels, params,
                                   g_loss + mlp_loss(profile, layer, channels)[0]))
    return options


def _knapsack(options: Sequence[Sequence[_Option]], unit: int, budget: float, slack: float
              ) -> list[int]:
    """Index of the chosen option per layer: the least total loss among the costs within
    ``slack`` parameters of ``budget`` (if none is reachable, the largest reachable cost below).
    Costs are counted in ``unit`` parameters (exact when ``unit`` divides every cost)."""
    size = int((budget + slack) // unit) + 1
    best = torch.full((size,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for layer_options in options:
        new = torch.full((size,), math.inf, dtype=torch.float64)
        choice = torch.full((size,), -1, dtype=torch.int32)
        for index, option in enumerate(layer_options):
            units = round(option.params / unit)
            if units >= size:
                continue
            candidate = best[:size - units] + option.loss
            better = candidate < new[units:]
            new[units:] = torch.where(better, candidate, new[units:])
            choice[units:] = torch.where(better, torch.tensor(index, dtype=torch.int32),
                                         choice[units:])
        best = new
        choices.append(choice)
    costs = torch.arange(size, dtype=torch.float64) * unit
    window = torch.where((costs - budget).abs() <= slack, best, torch.full_like(best, math.inf))
    if torch.isfinite(window).any():
        at = int(torch.argmin(window))
    else:
        at = int(torch.nonzero(torch.isfinite(best)).flatten().max())
    picked = []
    for layer_options, choice in zip(reversed(options), reversed(choices)):
        index = int(choice[at])
        picked.append(index)
        at -= round(layer_options[index].params / unit)
    return picked[::-1]


def _unit(options: Sequence[Sequence[_Option]], budget: float) -> int:
    """The largest cost unit dividing every option's cost, doubled while the DP would need
    more than MAX_UNITS cells (then costs are rounded to it)."""
    unit = 0
    for option in (o for opts in options for o in opts):
        unit = math.gcd(unit, option.params)
    unit = max(unit, 1)
    while budget / unit > MAX_UNITS:
        unit *= 2
    return unit


def _adjust(profile: SensitivityProfile, chosen: list[_Option], shapes, costs, multiple: int,
            budget: float, caps: Sequence[int]) -> list[_Option]:
    """Add or remove single channel blocks, cheapest in predicted loss first, until the
    parameters removed are within half a block of ``budget``."""
    chosen = list(chosen)
    for _ in range(4 * len(chosen) + 8):
        removed = sum(o.params for o in chosen)
        candidates = []
        for i, option in enumerate(chosen):
            block = multiple * costs[i].channel
            step = multiple if removed < budget else -multiple
            channels = option.channels + step
            if abs(budget - removed) <= block / 2 or not 0 <= channels <= caps[i]:
                continue
            delta = mlp_loss(profile, shapes[i].layer, channels)[0] - mlp_loss(
                profile, shapes[i].layer, option.channels)[0]
            candidates.append((delta if step > 0 else -delta, i, channels, step * costs[i].channel))
        if not candidates:
            return chosen
        _, i, channels, params = min(candidates)
        loss = chosen[i].loss - mlp_loss(profile, shapes[i].layer, chosen[i].channels)[0] \
            + mlp_loss(profile, shapes[i].layer, channels)[0]
        chosen[i] = _Option(chosen[i].groups, channels, chosen[i].params + params, loss)
    return chosen


def optimize_units(profile: SensitivityProfile, shapes: Sequence[LayerLayout],
                   costs: Sequence[UnitCost], budget: float, layer_range: range,
                   prune_attention: bool = True, prune_mlp: bool = True,
                   channel_multiple: int = 1, max_rate: float = 0.9) -> UnitAllocation:
    """Whole groups and channels to keep per layer minimising the predicted loss with
    ``budget`` parameters removed from the layers in ``layer_range``.

    Args:
        profile: the model's sensitivity profile (same layer shapes as ``shapes``).
        shapes, costs: L layouts and unit costs of the model.
        budget: parameters to remove (a share of the prunable parts of the layers in range).
        channel_multiple: channels are removed in blocks of :func:`channel_block` of it.
        max_rate: at most this share of a layer's prunable parameters goes.

    Returns:
        A :class:`UnitAllocation` like :func:`gqaprune_core.schedule.allocate_units`'s;
        ``budget_met`` says whether the budget was reached within 0.5 % of the prunable
        parameters (it is not when the layers cannot give that much under ``max_rate``).

    Raises:
        ValueError: a profile of other shapes, or neither part pruned.
    """
    if not (prune_attention or prune_mlp):
        raise ValueError("prune_attention and prune_mlp are both False: nothing to optimize")
    if profile.mlp_widths != tuple(s.mlp_width for s in shapes) or \
            profile.kv_heads != tuple(s.kv_heads for s in shapes):
        raise ValueError(f"the sensitivity profile was made for layers of MLP widths "
                         f"{sorted(set(profile.mlp_widths))} / {sorted(set(profile.kv_heads))} "
                         "groups, not this model's: recompute it for the model being pruned")
    inside = list(layer_range)
    multiple = channel_block([shapes[i].mlp_width for i in inside], channel_multiple)
    options = [_options(profile, shapes[i], costs[i], multiple, prune_attention, prune_mlp,
                        max_rate) for i in inside]
    block = min(multiple * costs[i].channel if prune_mlp else costs[i].group for i in inside)
    picked = _knapsack(options, _unit(options, budget), max(budget, 0.0), block / 2)
    chosen = [opts[k] for opts, k in zip(options, picked)]
    if prune_mlp:
        caps = [max(o.channels for o in opts) for opts in options]
        chosen = _adjust(profile, chosen, [shapes[i] for i in inside], [costs[i] for i in inside],
                         multiple, budget, caps)
    groups = [0] * len(shapes)
    channels = [0] * len(shapes)
    for i, option in zip(inside, chosen):
        groups[i], channels[i] = option.groups, option.channels
    parts = [(c.attention if prune_attention else 0) + (c.mlp if prune_mlp else 0) for c in costs]
    prunable = sum(parts[i] for i in inside)
    removed = sum(o.params for o in chosen)
    return UnitAllocation(
        groups_to_keep=tuple(s.kv_heads - g for s, g in zip(shapes, groups)),
        channels_to_keep=tuple(s.mlp_width - c for s, c in zip(shapes, channels)),
        params_prunable=prunable, params_budget=round(budget), params_removed=removed,
        ratio_requested=budget / prunable if prunable else 0.0,
        ratio_achieved=removed / prunable if prunable else 0.0,
        budget_met=abs(removed - budget) <= BUDGET_TOLERANCE * prunable)


def allocation_rates(allocation: UnitAllocation, shapes: Sequence[LayerLayout],
                     costs: Sequence[UnitCost], prune_attention: bool, prune_mlp: bool
                     ) -> list[float]:
    """Per layer, the share of its prunable parameters the allocation removes."""
    rates = []
    for s, c, g, k in zip(shapes, costs, allocation.groups_to_keep, allocation.channels_to_keep):
        part = (c.attention if prune_attention else 0) + (c.mlp if prune_mlp else 0)
        removed = (s.kv_heads - g) * c.group + (s.mlp_width - k) * c.channel
        rates.append(removed / part if part else 0.0)
    return rates
