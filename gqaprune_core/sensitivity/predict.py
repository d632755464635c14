"""A whole schedule's loss from the sensitivity profile: additive in the layers.

Notation: L layers, G KV groups, I MLP width. For a schedule that removes ``g_l`` groups and
``c_l`` MLP channels of layer l::

    Δ_l   = group_loss[l][g_l] + mlp_curve_l(c_l / I_l)        (nats per token)
    Σ     = κ · Σ_l Δ_l
    ratio = exp(Σ)                        predicted perplexity / dense perplexity
    σ²    = κ² Σ_l (σ_group² + σ_mlp²)     sampling error of the profile windows
    low   = exp(Σ - √(σ² + (BELOW · Σ)²)),   high = exp(Σ + √(σ² + (ABOVE · Σ)²))

κ, the compounding factor, is the profile's joint probe (every layer's MLP cut at once, see
:mod:`gqaprune_core.sensitivity.probe`) measured, over the additive sum for that same
schedule: how much more (or less) than the sum of single-layer losses cuts in all layers cost.
A profile without a probe has κ = 1.

``mlp_curve_l`` interpolates the profile's grid linearly over the *effective* losses
``max(loss, sigma)`` made non-decreasing: a cut whose measured loss is within one standard
error of zero (or below it: noise on ~1,000 tokens) counts as one standard error, so that a
noisy layer does not look free (the optimizer would otherwise pour the budget into it);
removing more never helps in expectation. The same holds for the groups.
``BELOW`` and ``ABOVE`` are the error of the scaled additive model itself, measured by
``benchmarks/sensitivity.py measure`` on 12 schedules (BENCHMARKS.md), with the re-fit's
feedback (the ``default`` preset's) and without: schedules of the rate heuristics came out at
0.79-0.91 x the predicted log-ratio with it and 0.84-1.12 x without, the optimizer's own
schedules at 1.56-1.69 x and 1.76-1.84 x (it picks the cuts the profile rates cheapest, where
the profile is most often too optimistic), so the range reaches far above the prediction and
a little below it.
Everything here is plain arithmetic on lists: a prediction takes well under a millisecond (the
app's sliders call it on every change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gqaprune_core.sensitivity.profile import SensitivityProfile

# Relative error of the scaled additive sum, below and above it: measured log-ratios were
# 0.79-1.12 x the predicted ones for the rate heuristics' schedules (0.79 with the re-fit's
# feedback) and up to 1.84 x for the optimizer's (benchmarks/sensitivity.py, BENCHMARKS.md
# "Sensitivity and prediction").
BELOW = 0.25
ABOVE = 0.85


@dataclass(frozen=True)
class Prediction:
    """A schedule's predicted loss increase ``loss_increase`` (Σ, nats per token) with the
    profile's sampling error ``sigma``, the predicted perplexity ratio to dense ``ratio =
    exp(Σ)`` and its range ``[low, high]`` (sampling and model error); ``per_layer``: the L
    terms Δ_l (before the compounding factor ``compounding``, κ)."""

    loss_increase: float
    sigma: float
    ratio: float
    low: float
    high: float
    per_layer: tuple[float, ...]
    compounding: float = 1.0

    def ppl(self, dense_ppl: float) -> tuple[float, float, float]:
        """``(predicted, low, high)`` perplexity given the dense model's on some text."""
        return dense_ppl * self.ratio, dense_ppl * self.low, dense_ppl * self.high

    def to_dict(self) -> dict:
        return {"loss_increase": round(self.loss_increase, 6), "sigma": round(self.sigma, 6),
                "ratio": round(self.ratio, 4), "low": round(self.low, 4),
                "high": round(self.high, 4), "compounding": round(self.compounding, 4),
                "additive": round(sum(self.per_layer), 6)}


def effective(losses: Sequence[float], sigmas: Sequence[float]) -> list[float]:
    """``max(loss, |sigma|)`` per point (0 where nothing is cut), made non-decreasing."""
    return monotone([0.0 if i == 0 else max(v, abs(s))
                     for i, (v, s) in enumerate(zip(losses, sigmas))])


def monotone(values: Sequence[float]) -> list[float]:
    """``values`` clipped at 0 and made non-decreasing (running maximum)."""
    out, top = [], 0.0
    for value in values:
        top = max(top, value)
        out.append(top)
    return out


def _interpolate(grid: Sequence[float], values: Sequence[float], x: float) -> float:
    """Linear interpolation on an increasing grid; beyond its end, the last segment's slope."""
    if x <= grid[0]:
        return values[0]
    for i in range(1, len(grid)):
        if x <= grid[i] or i == len(grid) - 1:
            span = grid[i] - grid[i - 1]
            return values[i - 1] + (values[i] - values[i - 1]) * (x - grid[i - 1]) / span
    return values[-1]


def mlp_loss(profile: SensitivityProfile, layer: int, channels_removed: int
             ) -> tuple[float, float]:
    """``(loss, sigma)`` of removing ``channels_removed`` MLP channels of ``layer``."""
    width = profile.mlp_widths[layer]
    if not 0 <= channels_removed < width:
        raise ValueError(f"layer {layer}: cannot remove {channels_removed} of {width} channels")
    if channels_removed == 0:
        return 0.0, 0.0
    rate = channels_removed / width
    loss = _interpolate(profile.mlp_rates,
                        effective(profile.mlp_loss[layer], profile.mlp_sigma[layer]), rate)
    sigma = _interpolate(profile.mlp_rates, [abs(s) for s in profile.mlp_sigma[layer]], rate)
    return loss, sigma


def group_loss(profile: SensitivityProfile, layer: int, groups_removed: int
               ) -> tuple[float, float]:
    """``(loss, sigma)`` of removing ``groups_removed`` whole GQA groups of ``layer``."""
    groups = profile.kv_heads[layer]
    if not 0 <= groups_removed < groups:
        raise ValueError(f"layer {layer}: cannot remove {groups_removed} of {groups} groups "
                         "(a layer keeps at least one)")
    curve = effective(profile.group_loss[layer], profile.group_sigma[layer])
    return curve[groups_removed], abs(profile.group_sigma[layer][groups_removed])


def compounding(profile: SensitivityProfile) -> float:
    """κ: the joint probe's measured loss increase over the additive sum for its schedule
    (every layer loses ``round(probe_rate * I_l)`` MLP channels); 1.0 without a probe."""
    if not profile.probe_rate:
        return 1.0
    additive = sum(mlp_loss(profile, layer, round(profile.probe_rate * width))[0]
                   for layer, width in enumerate(profile.mlp_widths))
    return max(profile.probe_loss, 0.0) / additive if additive > 0 else 1.0


def predict(profile: SensitivityProfile, groups_removed: Sequence[int],
            channels_removed: Sequence[int]) -> Prediction:
    """The prediction for a schedule given as L group and L channel counts removed.

    Raises:
        ValueError: counts of the wrong length or outside a layer's units.
    """
    if not len(groups_removed) == len(channels_removed) == profile.layers:
        raise ValueError(f"need {profile.layers} group and channel counts, got "
                         f"{len(groups_removed)} and {len(channels_removed)}")
    terms, variance = [], 0.0
    for layer, (groups, channels) in enumerate(zip(groups_removed, channels_removed)):
        g_loss, g_sigma = group_loss(profile, layer, groups)
        m_loss, m_sigma = mlp_loss(profile, layer, channels)
        terms.append(g_loss + m_loss)
        variance += g_sigma ** 2 + m_sigma ** 2
    factor = compounding(profile)
    total = factor * sum(terms)
    sampling = factor ** 2 * variance
    below = math.sqrt(sampling + (BELOW * total) ** 2)
    above = math.sqrt(sampling + (ABOVE * total) ** 2)
    return Prediction(total, math.sqrt(sampling), math.exp(total), math.exp(total - below),
                      math.exp(total + above), tuple(terms), factor)


def predict_kept(profile: SensitivityProfile, groups_to_keep: Sequence[int],
                 channels_to_keep: Sequence[int]) -> Prediction:
    """:func:`predict` for counts KEPT per layer (as in a UnitAllocation)."""
    return predict(profile, [g - k for g, k in zip(profile.kv_heads, groups_to_keep)],
                   [w - k for w, k in zip(profile.mlp_widths, channels_to_keep)])
