"""The quality gate: the largest ratio whose MEASURED perplexity on held-out validation text
stays within ``(1 + max_ppl_increase)`` x dense, in a few steps.

Validation text is carved from the calibration parts (``NAME:fit`` corpora, see
:mod:`gqaprune_core.data`): every source's calibration documents are split again, 70 % to
calibrate (layer scores, profile, unit scores, re-fit) and 30 % to validate; the evaluation
parts are never touched. The search:

1. the predictor first: bisection over the ratio in ``(0, pruning_ratio]`` for the largest
   one whose predicted perplexity ratio is within the gate (milliseconds per step);
2. then measured: prune a copy at that ratio and measure the geometric mean over the sources
   of the perplexity ratio on their validation windows; bisect between the largest passing and
   the smallest failing ratio measured so far, for at most ``steps`` prunes in all.

The result holds every step (ratio, predicted, measured: the ratio-to-perplexity curve) for
``report.json``. The chosen ratio is the largest MEASURED one that passed (0 if none did), and
the result keeps that prune (``pruned``): the run takes its weights instead of pruning again at
the same ratio with the same data (one pruned copy more in memory while the search goes on).
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def _predicted(config, model: nn.Module, importance, profile: SensitivityProfile,
               ratio: float) -> float:
    from gqaprune_core.pipeline import plan_units

    allocation = plan_units(config.with_(pruning_ratio=ratio), model, importance, profile)[1]
    return predict_kept(profile, allocation.groups_to_keep, allocation.channels_to_keep).ratio


def largest_predicted(config, model: nn.Module, importance, profile: SensitivityProfile,
                      limit: float, iterations: int = 10) -> tuple[float, list[GateStep]]:
    """The largest ratio in ``(0, config.pruning_ratio]`` predicted within ``limit``, and the
    predicted points visited. A ratio the schedule refuses (e.g. below ``min_pruning_rate``)
    counts as failing."""
    def value(ratio: float) -> float:
        try:
            return _predicted(config, model, importance, profile, ratio)
        except ValueError:
            return math.inf

    low, high = 0.0, config.pruning_ratio
    points = [GateStep(high, value(high))]
    if points[0].predicted <= limit:
        return high, points
    for _ in range(iterations):
        middle = (low + high) / 2
        points.append(GateStep(middle, value(middle)))
        low, high = (middle, high) if points[-1].predicted <= limit else (low, middle)
        if high - low < RESOLUTION:
            break
    return low, points


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
    ratio, curve = largest_predicted(config, model, importance, profile, limit)
    passing, failing, kept = 0.0, math.inf, None
    cap = config.pruning_ratio
    for step in range(steps):
        if progress is not None:
            progress(step, steps)
        if ratio <= 0:
            break
        measured, by_source, pruned = _measure(config, model, tokenizer, importance, profile,
                                               ratio, windows, dense)
        passed = measured <= limit
        if passed and ratio > passing:
            kept = pruned  # the largest passing prune so far; the others are dropped
        del pruned
        curve.append(GateStep(ratio, _predicted(config, model, importance, profile, ratio),
                              measured, by_source, passed))
        passing, failing = (max(passing, ratio), failing) if passed else (passing,
                                                                         min(failing, ratio))
        if (passed and ratio >= cap) or min(failing, cap) - passing < RESOLUTION:
            break
        ratio = round((passing + min(failing, cap)) / 2 / RESOLUTION) * RESOLUTION
        if ratio <= passing:
            break
    return GateResult(limit, passing, tuple(curve), config.calibration_dataset, dense, kept)
