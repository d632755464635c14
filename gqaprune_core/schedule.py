"""Layer scores → per-layer pruning rates → whole units (GQA groups, MLP channels) per layer.

Notation: L layers, H query heads, G KV groups, D head_dim, I MLP width, E hidden size.

Two pure steps:

1. :func:`layer_rates` turns one importance score per layer into one pruning rate per layer
   whose parameter-weighted mean over the layers in range is exactly the target, every rate
   within ``[min_rate, max_rate]``.
2. :func:`allocate_units` turns those rates into whole units. A GQA group is coarse (on the
   demo model one group is a third of a layer's attention, 8.3 % of the layer). Two roundings:
   ``"across"`` rounds group counts across layers (largest remainder), so attention gives
   about its share of the budget; ``"per_layer"`` (the original project's rule) removes
   ``floor(rate * groups)`` in each layer, so a layer loses a group only once its rate reaches
   one group's share. Either way MLP channels (1,728 parameters each on the demo model) absorb
   what the groups leave, so the parameters removed match the budget.

:func:`unit_costs` reads from a model's weights how many parameters one unit removes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from gqaprune_core.models import LayerLayout, decoder_layers, layout

Strategy = Literal["inverse", "proportional", "uniform"]
STRATEGIES: tuple[str, ...] = ("inverse", "proportional", "uniform")
GroupRounding = Literal["across", "per_layer"]
GROUP_ROUNDINGS: tuple[str, ...] = ("across", "per_layer")
BUDGET_TOLERANCE = 0.005  # |removed - budget| allowed, as a fraction of the prunable parameters


# ---------------------------------------------------------------------------------------------
# scores -> rates


def _check_rate_settings(target: float, min_rate: float, max_rate: float, alpha: float) -> None:
    for name, value in (("target", target), ("min_rate", min_rate), ("max_rate", max_rate)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    if min_rate > max_rate:
        raise ValueError(f"min_rate {min_rate} is greater than max_rate {max_rate}")
    if target > 0 and not min_rate <= target <= max_rate:
        raise ValueError(
            f"target {target} cannot be reached with every rate in [min_rate {min_rate}, "
            f"max_rate {max_rate}]: a weighted mean of such rates lies in that interval")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _layer_range(count: int, layer_start: int, layer_end: int | None) -> range:
    end = count if layer_end is None else layer_end
    if not 0 <= layer_start < end <= count:
        raise ValueError(f"layer range [{layer_start}, {layer_end}) is empty or outside the "
                         f"model's {count} layers")
    return range(layer_start, end)


def _spread(scores: Sequence[float], strategy: Strategy, alpha: float) -> list[float]:
    """Positive relative rates (before scaling), one per score; larger = prune more.

    The scores are shifted to start at 0 and divided by the median of the positive shifts, then
    ``log1p`` compresses outliers (removing the first layer of a small LM can raise perplexity a
    thousand times more than removing any other) while keeping the order. The result ``u`` is
    rescaled to [0, 1]; the base is ``2 - u`` (inverse: important layers pruned less) or
    ``1 + u`` (proportional), so before clipping the extreme layers differ by a factor
    ``2 ** alpha``. Constant scores (no positive shift) give equal rates.
    """
    if strategy == "uniform" or alpha == 0:
        return [1.0] * len(scores)
    low = min(scores)
    shifts = [s - low for s in scores]
    positive = sorted(x for x in shifts if x > 0)
    if not positive:
        return [1.0] * len(scores)
    median = positive[len(positive) // 2]
    logged = [math.log1p(x / median) for x in shifts]
    top = max(logged)
    unit = [x / top for x in logged]
    base = [2.0 - u for u in unit] if strategy == "inverse" else [1.0 + u for u in unit]
    return [b ** alpha for b in base]


def _fill(spread: Sequence[float], weights: Sequence[float], target: float, low: float,
          high: float) -> list[float]:
    """Rates ``clip(c * spread_i, low, high)`` with the scale ``c`` chosen so that the weighted
    mean is exactly ``target`` (water-filling).

    The weighted mean ``f(c)`` is continuous, non-decreasing and linear between the "knots"
    ``low / spread_i`` and ``high / spread_i`` where a layer enters or leaves a bound, with
    ``f(0) = low`` and ``f(inf) = high``. Walking the knots in order finds the segment that
    contains ``target``; interpolating inside it is exact, because ``f`` is linear there (the
    clipped layers stay fixed, the free ones scale together). Requires ``low <= target <= high``.
    """
    if target <= low or target >= high:  # also absorbs rounding at the ends
        return [min(max(target, low), high)] * len(spread)
    total = sum(weights)

    def mean_at(scale: float) -> float:
        return sum(w * min(max(scale * v, low), high) for w, v in zip(weights, spread)) / total

    previous_scale, previous_mean = 0.0, low
    for knot in sorted({low / v for v in spread} | {high / v for v in spread}):
        current = mean_at(knot)
        if current >= target:
            if current == previous_mean:
                scale = knot
            else:
                scale = previous_scale + (target - previous_mean) * (knot - previous_scale) / (
                    current - previous_mean)
            return [min(max(scale * v, low), high) for v in spread]
        previous_scale, previous_mean = knot, current
    raise AssertionError(f"target {target} above the reachable mean {previous_mean}")


def layer_rates(scores: Sequence[float], target: float, strategy: Strategy = "inverse",
                alpha: float = 1.0, min_rate: float = 0.15, max_rate: float = 0.5,
                layer_start: int = 0, layer_end: int | None = None,
                weights: Sequence[float] | None = None) -> list[float]:
    """One pruning rate per layer from one importance score per layer (higher = more important).

    Args:
        scores: L finite scores.
        target: the wanted mean rate over layers ``[layer_start, layer_end)``, weighted by
            ``weights``; in [0, 1).
        strategy: ``"inverse"`` prunes important layers less, ``"proportional"`` more,
            ``"uniform"`` gives every layer in range the target.
        alpha: sharpness, >= 0; before clipping the most and least favoured layers differ by a
            factor ``2 ** alpha``; 0 is uniform.
        min_rate, max_rate: bounds of every in-range rate, ``0 <= min_rate <= max_rate < 1``.
        layer_start, layer_end: the layers to prune (``None``: through the last layer).
        weights: L positive weights, normally each layer's prunable parameter count (see
            :func:`unit_costs`) so the target is a fraction of parameters; default equal.

    Returns:
        L rates: 0.0 outside the range; inside it each within ``[min_rate, max_rate]`` with the
        weighted mean equal to ``target`` (up to float rounding). ``target == 0`` gives all
        zeros, whatever ``min_rate``.

    Raises:
        ValueError: naming the values, for settings outside the ranges above, a target outside
            ``[min_rate, max_rate]``, an empty or out-of-bounds layer range, ``weights`` of the
            wrong length or not positive, or non-finite scores.
    """
    _check_rate_settings(target, min_rate, max_rate, alpha)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    count = len(scores)
    if count == 0:
        raise ValueError("scores is empty: need one score per layer")
    span = _layer_range(count, layer_start, layer_end)
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} layer scores")
    bad = [i for i in span if not (math.isfinite(weights[i]) and weights[i] > 0)]
    if bad:
        raise ValueError(f"weights of layers {bad} must be finite and > 0, got "
                         f"{[weights[i] for i in bad]}")
    inside = [float(scores[i]) for i in span]
    if not all(math.isfinite(s) for s in inside):
        raise ValueError(f"layer scores must be finite, got {inside}")
    rates = [0.0] * count
    if target == 0:
        return rates
    spread = _spread(inside, strategy, alpha)
    filled = _fill(spread, [weights[i] for i in span], target, min_rate, max_rate)
    for i, rate in zip(span, filled):
        rates[i] = rate
    return rates


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
