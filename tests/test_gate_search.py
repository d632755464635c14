"""The quality gate's measured search on synthetic curves (no model: the curves are functions).

The pipeline-level gate (a tiny model pruned and measured) is in ``test_sensitivity.py``.
"""

from __future__ import annotations

import math

import pytest

from gqaprune_core.sensitivity.gate import (RESOLUTION, GateStep, correction, largest_predicted,
                                            measured_search, next_ratio)

LIMIT = 1.5


def predicted(ratio: float) -> float:
    return math.exp(2.0 * ratio)


def biased(ratio: float) -> float:
    """The truth: the prediction's log-ratio times 0.75 (1 + ratio / 2), a bias that drifts
    with the ratio (the rate heuristics' schedules measured 0.79-0.91x their prediction)."""
    return math.exp(0.75 * (1.0 + ratio / 2) * 2.0 * ratio)


def largest_passing(truth) -> float:
    """The largest ratio the truth keeps within LIMIT, to 1e-9."""
    low, high = 0.0, 1.0
    while high - low > 1e-9:
        middle = (low + high) / 2
        low, high = (middle, high) if truth(middle) <= LIMIT else (low, middle)
    return low


def search(truth, predict=predicted, cap: float = 0.3, steps: int = 4):
    first, _ = largest_predicted(predict, cap, LIMIT)
    return measured_search(first, lambda r: (truth(r), {"x": truth(r)}, f"pruned@{r}"),
                           predict, LIMIT, cap, steps)


def test_the_corrected_predictor_lands_next_to_the_limit_in_fewer_steps_than_bisection():
    best, curve, kept = search(biased)
    target = largest_passing(biased)  # about 0.241; the predictor alone says 0.2016
    assert len(curve) <= 3
    assert target - RESOLUTION <= best <= target
    assert kept == f"pruned@{best}"  # the prune of the chosen ratio, not another
    assert all((s.measured <= LIMIT) == s.passed for s in curve)
    # plain bisection from the same first point, as many measurements: 0.2016 passes, 0.2508
    # fails, 0.2262 passes
    ratio, passing, failing = curve[0].ratio, 0.0, math.inf
    for _ in curve:
        passing, failing = ((ratio, failing) if biased(ratio) <= LIMIT else (passing, ratio))
        ratio = (passing + min(failing, 0.3)) / 2
    assert passing < best - 2 * RESOLUTION


@pytest.mark.parametrize("truth", [
    lambda r: math.exp(3.0 * r),  # the prediction is too optimistic
    lambda r: math.exp(1.0 * r),  # too pessimistic: the cap passes
    lambda r: 1.0 + 50.0 * max(r - 0.1, 0.0) ** 2,  # a different shape altogether
])
def test_every_measured_ratio_lies_inside_the_bracket_of_the_ones_before(truth):
    best, curve, _ = search(truth, steps=6)
    for index, step in enumerate(curve[1:], start=1):
        before = curve[:index]
        passing = max((s.ratio for s in before if s.passed), default=0.0)
        failing = min((s.ratio for s in before if not s.passed), default=math.inf)
        assert passing < step.ratio < failing and step.ratio <= 0.3
    assert best == max([0.0] + [s.ratio for s in curve if s.passed])
    assert best >= min(largest_passing(truth), 0.3) - 2 * RESOLUTION
    if truth(0.3) <= LIMIT:
        assert best == 0.3 and curve[-1].ratio == 0.3


def test_without_a_usable_prediction_the_search_bisects():
    flat = lambda r: 1.0  # noqa: E731  (a predictor that says nothing is lost)
    step = GateStep(0.2, flat(0.2), 1.3, None, True)
    assert correction([step]) is None
    assert next_ratio([step], flat, LIMIT, 0.3) == pytest.approx(0.25)
    failed = GateStep(0.25, math.inf, 1.8, None, False)  # refused by the predictor
    assert next_ratio([step, failed], flat, LIMIT, 0.3) == pytest.approx(0.225)


def test_the_search_stops_when_nothing_is_left_between_pass_and_fail():
    steps = [GateStep(0.2, 1.4, 1.45, None, True), GateStep(0.204, 1.5, 1.52, None, False)]
    assert next_ratio(steps, predicted, LIMIT, 0.3) is None
    # noise: a pass above a fail leaves no interval either
    noisy = [GateStep(0.25, 1.6, 1.49, None, True), GateStep(0.2, 1.4, 1.51, None, False)]
    assert next_ratio(noisy, predicted, LIMIT, 0.3) is None
    assert next_ratio([GateStep(0.3, 1.8, 1.4, None, True)], predicted, LIMIT, 0.3) is None


def test_the_correction_interpolates_between_measured_points():
    steps = [GateStep(0.1, math.e, math.e ** 0.5, None, True),
             GateStep(0.3, math.e, math.e ** 1.0, None, False)]
    scale = correction(steps)
    assert scale(0.0) == pytest.approx(0.5) and scale(0.2) == pytest.approx(0.75)
    assert scale(0.5) == pytest.approx(1.0)
