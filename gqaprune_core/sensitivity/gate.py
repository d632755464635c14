"""The quality gate: the largest ratio whose MEASURED perplexity on held-out validation text
stays within ``(1 + max_ppl_increase)`` x dense, in a few steps.

Validation text is carved from the calibration parts (``NAME:fit`` corpora, see
:mod:`gqaprune_core.data`): every source's calibration documents are split again, 70 % to
calibrate (layer scores, profile, unit scores, re-fit) and 30 % to validate; the evaluation
parts are never touched. The search:

1. the predictor first: bisection over the ratio in ``(0, pruning_ratio]`` for the largest
   one whose predicted perplexity ratio is within the gate (milliseconds per step);
2. then measured: prune a copy at that ratio and measure the geometric mean over the sources
   of the perplexity ratio on their validation windows; the next ratio lies between the largest
   passing and the smallest failing ratio measured so far, where the predictor, corrected by
   what the measurements found of its error, crosses the gate (:func:`next_ratio`), for at
   most ``steps`` prunes in all.

The result holds every step (ratio, predicted, measured: the ratio-to-perplexity curve) for
``report.json``. The chosen ratio is the largest MEASURED one that passed (0 if none did), and
the result keeps that prune (``pruned``): the run takes its weights instead of pruning again at
the same ratio with the same data (one pruned copy more in memory while the search goes on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from gqaprune_core.data import evaluation_windows
from gqaprune_core.evaluate import perplexity
from gqaprune_core.sensitivity.predict import predict_kept
from gqaprune_core.sensitivity.profile import SensitivityProfile

if TYPE_CHECKING:
    from gqaprune_core.pipeline import PipelineResult

GATE_STEPS = 4  # measured prunes at most
VALIDATION_WINDOWS = 4  # per source
VALIDATION_SEQ_LEN = 512
RESOLUTION = 0.005  # ratios closer than this are not told apart


def held_out_name(corpus: str) -> str:
    """The fit share of every source of ``corpus``: ``demo+pydoc`` -> ``demo:fit+pydoc:fit``."""
    return "+".join(part if part.endswith(":fit") else f"{part}:fit"
                    for part in corpus.split("+"))


@dataclass(frozen=True)
class GateStep:
    """One point of the ratio-to-perplexity curve; ``measured`` None: predicted only."""

    ratio: float
    predicted: float
    measured: float | None = None
    by_source: dict | None = None
    passed: bool | None = None


@dataclass(frozen=True)
class GateResult:
    """The ratio chosen under ``limit`` (= 1 + max_ppl_increase) and the steps taken;
    ``pruned``: the pipeline's result at ``ratio`` (None when nothing passed)."""

    limit: float
    ratio: float
    steps: tuple[GateStep, ...]
    validation: str
    dense: dict
    pruned: PipelineResult | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"limit": self.limit, "ratio": self.ratio, "validation": self.validation,
                "dense": self.dense, "curve": [asdict(s) for s in self.steps]}


def predictor(config, model: nn.Module, importance, profile: SensitivityProfile
              ) -> Callable[[float], float]:
    """ratio -> the predicted perplexity ratio of the schedule at that ratio (milliseconds); a
    ratio the schedule refuses (e.g. below ``min_pruning_rate``) predicts infinity."""
    from gqaprune_core.pipeline import plan_units

    def predict(ratio: float) -> float:
        try:
            allocation = plan_units(config.with_(pruning_ratio=ratio), model, importance,
                                    profile)[1]
        except ValueError:
            return math.inf
        return predict_kept(profile, allocation.groups_to_keep, allocation.channels_to_keep).ratio

    return predict


def largest_fitting(fits: Callable[[float], bool], low: float, high: float,
                    iterations: int = 10) -> float:
    """The largest ratio in ``[low, high]`` that ``fits`` (``high`` itself first), by bisection
    assuming ``fits`` is true up to some ratio and false beyond; ``low`` when none does."""
    if fits(high):
        return high
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
        if high - low < RESOLUTION:
            break
    return low


def largest_predicted(predict: Callable[[float], float], cap: float, limit: float
                      ) -> tuple[float, list[GateStep]]:
    """The largest ratio in ``(0, cap]`` predicted within ``limit``, and the predicted points
    visited."""
    points: list[GateStep] = []

    def fits(ratio: float) -> bool:
        points.append(GateStep(ratio, predict(ratio)))
        return points[-1].predicted <= limit

    return largest_fitting(fits, 0.0, cap), points


def correction(measured: Sequence[GateStep]) -> Callable[[float], float] | None:
    """s(ratio): measured over predicted log-ratio, linear between the measured ratios and
    constant beyond them; None when no measured point gives one (a predicted or measured ratio
    at or below 1, or infinite, says nothing about the scale)."""
    known = sorted((s.ratio, math.log(s.measured) / math.log(s.predicted)) for s in measured
                   if 1.0 < s.predicted < math.inf and 1.0 < s.measured < math.inf)
    if not known:
        return None

    def scale(ratio: float) -> float:
        if ratio <= known[0][0]:
            return known[0][1]
        for (r0, s0), (r1, s1) in zip(known, known[1:]):
            if ratio <= r1:
                return s0 + (s1 - s0) * (ratio - r0) / (r1 - r0)
        return known[-1][1]

    return scale


def next_ratio(measured: Sequence[GateStep], predict: Callable[[float], float], limit: float,
               cap: float) -> float | None:
    """The next ratio to measure, strictly between the largest passing and the smallest failing
    ratio measured so far (or up to ``cap``); None when that interval is narrower than
    ``RESOLUTION`` or the cap itself passed.

    The predictor, corrected by the measurements: where the prediction errs by a factor s on
    the log-ratio (a steady bias for one schedule, BENCHMARKS "Sensitivity and prediction"),
    the limit is crossed where ``s(r) · ln predict(r) = ln limit``, with s interpolated between
    the measured points (:func:`correction`). Bisection of the interval when no measurement
    gives a correction."""
    passing = max((s.ratio for s in measured if s.passed), default=0.0)
    failing = min((s.ratio for s in measured if not s.passed), default=math.inf)
    upper = min(failing, cap)
    if passing >= cap or upper - passing < RESOLUTION:
        return None
    scale = correction(measured)
    if scale is None:
        guess = (passing + upper) / 2
    else:
        target = math.log(limit)

        def fits(ratio: float) -> bool:
            predicted = predict(ratio)
            return predicted <= 1.0 or (predicted < math.inf
                                        and scale(ratio) * math.log(predicted) <= target)

        guess = largest_fitting(fits, passing, upper)
    # at least one resolution step away from what is measured already
    top = upper if failing > cap else failing - RESOLUTION
    guess = round(min(max(round(guess / RESOLUTION) * RESOLUTION, passing + RESOLUTION), top), 6)
    return guess if guess - passing >= RESOLUTION / 2 and guess < failing else None


def _measure(config, model: nn.Module, tokenizer, importance, profile, ratio: float,
             windows: dict, dense: dict) -> tuple[float, dict, PipelineResult]:
    from gqaprune_core.pipeline import run_pipeline

    run = config.with_(pruning_ratio=ratio, max_ppl_increase=None, eval_datasets=(),
                       recovery="none")
    pruned = run_pipeline(run, model, tokenizer, importance=importance, profile=profile,
                          copy_model=True, evaluate=False)
    ratios = {n: perplexity(pruned.model, w, corpus=n).value / dense[n]
              for n, w in windows.items()}
    return math.exp(sum(map(math.log, ratios.values())) / len(ratios)), ratios, pruned


def measured_search(first: float, measure: Callable[[float], tuple[float, dict, object]],
                    predict: Callable[[float], float], limit: float, cap: float,
                    steps: int = GATE_STEPS, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[float, list[GateStep], object]:
    """Measure ``first``, then each :func:`next_ratio`, for at most ``steps`` measurements.
    ``measure(ratio)`` gives ``(measured ratio to dense, by source, pruned)``. Returns the
    largest passing ratio (0 if none), the measured points and that ratio's ``pruned``."""
    curve: list[GateStep] = []
    best, kept = 0.0, None
    ratio: float | None = first
    for step in range(steps):
        if progress is not None:
            progress(step, steps)
        if ratio is None or ratio <= 0:
            break
        measured, by_source, pruned = measure(ratio)
        passed = measured <= limit
        if passed and ratio > best:
            best, kept = ratio, pruned  # the largest passing prune so far; others are dropped
        del pruned
        curve.append(GateStep(ratio, predict(ratio), measured, by_source, passed))
        ratio = next_ratio(curve, predict, limit, cap)
    return best, curve, kept


def gate_search(config, model: nn.Module, tokenizer, importance, profile: SensitivityProfile,
                steps: int = GATE_STEPS, progress: Callable[[int, int], None] | None = None
                ) -> GateResult:
    """See the module docstring. ``config.calibration_dataset`` must be a fit share
    (:func:`held_out_name`), whose evaluation parts are the validation windows."""
    if config.max_ppl_increase is None:
        raise ValueError("gate_search needs max_ppl_increase (e.g. 0.25)")
    limit = 1.0 + config.max_ppl_increase
    sources = config.calibration_dataset.split("+")
    windows = {s: evaluation_windows(tokenizer, s, VALIDATION_SEQ_LEN, VALIDATION_WINDOWS)
               for s in sources}
    dense = {n: perplexity(model, w, corpus=n).value for n, w in windows.items()}
    predict = predictor(config, model, importance, profile)
    first, curve = largest_predicted(predict, config.pruning_ratio, limit)
    ratio, measured, kept = measured_search(
        first, lambda r: _measure(config, model, tokenizer, importance, profile, r, windows,
                                  dense),
        predict, limit, config.pruning_ratio, steps, progress)
    return GateResult(limit, ratio, tuple(curve + measured), config.calibration_dataset, dense,
                      kept)
