"""Layer scores → per-layer pruning rates (the first step of the schedule; the second, rates →
whole units, is :mod:`gqaprune_core.schedule`).

:func:`layer_rates` turns one importance score per layer into one pruning rate per layer whose
parameter-weighted mean over the layers in range is exactly the target, every rate within
``[min_rate, max_rate]``: the scores set the rates' relative sizes (:func:`_spread`), one scale
found by water-filling meets the target (:func:`_fill`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Strategy = Literal["inverse", "proportional", "uniform"]
STRATEGIES: tuple[str, ...] = ("inverse", "proportional", "uniform")


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
            :func:`gqaprune_core.schedule.unit_costs`) so the target is a fraction of
            parameters; default equal.

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
