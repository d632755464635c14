"""The optimized schedule: per layer, the whole GQA groups and MLP channel blocks to remove so
that the predicted loss is smallest at exactly the requested parameter budget.

Notation: L layers, G KV groups, I MLP width, m = channel block (``channel_multiple``).

A knapsack over parameter cost, solved by dynamic programming: every layer in range offers the
options (g groups, c channels) with g in 0..G-1 (0 only without attention pruning) and c a
multiple of m up to the profile grid's last rate (90 % of I; 0 only without MLP pruning) and
at most ``max_rate`` of the layer's prunable parameters. An option costs ``g * group + c *
channel`` parameters (:func:`gqaprune_core.schedule.unit_costs`) and its predicted loss is
``group_loss + mlp_loss`` (:mod:`gqaprune_core.sensitivity.predict`). Costs are counted in units of the
greatest common divisor of all option costs, so the DP is exact, unless that needs more than
MAX_UNITS cells: then in channel blocks (13,824 parameters on the demo model; a GQA group, 21.3
blocks, is rounded to 21). The DP returns the least total loss among the costs within half a
block of the budget; a final pass adds or removes single channel blocks, cheapest in predicted
loss first, until the true parameter count is within half a block of the budget. How the
budget splits between attention and MLP follows from the measured loss per parameter, not
from a rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gqaprune_core.models import LayerLayout
from gqaprune_core.schedule import BUDGET_TOLERANCE, UnitAllocation, UnitCost, channel_block
from gqaprune_core.sensitivity.predict import effective, group_loss, mlp_loss
from gqaprune_core.sensitivity.profile import SensitivityProfile

# DP cells at most with the exact unit; the demo model at 20 % would need 5,840 cells of 4,608
# parameters (one block of 8 channels is 3), so it runs on blocks: 1,950 cells, ~3x faster
MAX_UNITS = 3_000


@dataclass(frozen=True)
class _Option:
    groups: int
    channels: int
    params: int
    loss: float


def _options(profile: SensitivityProfile, shape: LayerLayout, cost: UnitCost, multiple: int,
             prune_attention: bool, prune_mlp: bool, max_rate: float) -> list[_Option]:
    """Every (groups, channels) option of one layer within ``max_rate`` of its prunable part."""
    layer = shape.layer
    part = (cost.attention if prune_attention else 0) + (cost.mlp if prune_mlp else 0)
    most_channels = int(profile.mlp_rates[-1] * shape.mlp_width) // multiple * multiple
    most_channels = min(most_channels, shape.mlp_width - multiple) if prune_mlp else 0
    channels = np.arange(0, most_channels + 1, multiple)
    # the predictor's MLP curve (non-decreasing, linear between grid rates), all counts at once
    curve = np.interp(channels / shape.mlp_width, profile.mlp_rates,
                      effective(profile.mlp_loss[layer], profile.mlp_sigma[layer]))
    options = []
    for groups in range(shape.kv_heads if prune_attention else 1):
        g_loss = group_loss(profile, layer, groups)[0]
        params = groups * cost.group + channels * cost.channel
        for count, p, loss in zip(channels.tolist(), params.tolist(), curve.tolist()):
            if p > max_rate * part + 1e-6:
                break
            options.append(_Option(groups, count, p, g_loss + loss))
    return options


def _knapsack(options: Sequence[Sequence[_Option]], unit: int, budget: float, slack: float
              ) -> list[int]:
    """Index of the chosen option per layer: the least total loss among the costs within
    ``slack`` parameters of ``budget`` (if none is reachable, the largest reachable cost below).
    Costs are counted in ``unit`` parameters (exact when ``unit`` divides every cost). One
    layer is one (options x cells) min-plus step, vectorized."""
    size = int((budget + slack) // unit) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    cells = np.arange(size)
    choices = []
    for layer_options in options:
        units = np.array([round(o.params / unit) for o in layer_options])
        losses = np.array([o.loss for o in layer_options])
        source = cells[None, :] - units[:, None]  # (options, cells): where each option came from
        candidate = np.where(source >= 0, best[np.clip(source, 0, None)], np.inf) + losses[:, None]
        choice = candidate.argmin(axis=0)
        best = candidate[choice, cells]
        choices.append(choice)
    costs = cells * float(unit)
    window = np.where(np.abs(costs - budget) <= slack, best, np.inf)
    if np.isfinite(window).any():
        at = int(window.argmin())
    else:
        at = int(np.flatnonzero(np.isfinite(best)).max())
    picked = []
    for layer_options, choice in zip(reversed(options), reversed(choices)):
        index = int(choice[at])
        picked.append(index)
        at -= round(layer_options[index].params / unit)
    return picked[::-1]


def _unit(options: Sequence[Sequence[_Option]], budget: float, block: int) -> int:
    """The largest cost unit dividing every option's cost (the DP is then exact), or, when
    that needs more than MAX_UNITS cells, the channel ``block`` (group costs are then rounded
    to whole blocks, at most half a block per layer, and the final count is corrected)."""
    unit = 0
    for option in (o for opts in options for o in opts):
        unit = math.gcd(unit, option.params)
    unit = max(unit, 1)
    return unit if budget / unit <= MAX_UNITS else max(unit, block)


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
    picked = _knapsack(options, _unit(options, budget, block), max(budget, 0.0), block / 2)
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
