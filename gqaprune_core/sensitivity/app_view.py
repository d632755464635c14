"""Plain values the app's pages show from a sensitivity profile (no streamlit here).

Rate tuning calls :func:`prediction_view` on every slider move (it must stay well under the
~100 ms a redraw may take: it is list arithmetic, timed in ``elapsed_ms``); Layer importance
shows :func:`heatmap` (layer x MLP rate); the GQA page shows :func:`group_costs`; Prune &
evaluate shows the report's ``predicted`` entry next to the measured perplexity
(:func:`predicted_vs_measured`) and, for a run with the quality gate, its ratio-to-perplexity
curve (:func:`gate_curve`, :func:`gate_summary`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from torch import nn

from gqaprune_core.schedule import UnitAllocation
from gqaprune_core.sensitivity.predict import Prediction, effective, predict_kept
from gqaprune_core.sensitivity.profile import ProfileSettings, SensitivityProfile
from gqaprune_core.sensitivity.store import sensitivity_profile


@dataclass(frozen=True)
class PredictionView:
    """What Rate tuning shows: the prediction, the perplexity it implies on the profile's own
    windows (validation documents of the calibration text), and how long it took (ms)."""

    prediction: Prediction
    dense_ppl: float
    elapsed_ms: float

    @property
    def ppl(self) -> tuple[float, float, float]:
        return self.prediction.ppl(self.dense_ppl)

    def summary(self) -> str:
        p = self.prediction
        value, low, high = self.ppl
        scaled = (f"; the layers' single-cut losses added up, x{p.compounding:.2f} for how "
                  f"they compounded when every layer was cut at once (the profile's probe)"
                  if p.compounding != 1.0 else "; the layers' single-cut losses added up")
        return (f"x{p.ratio:.2f} the dense perplexity (range x{p.low:.2f}-x{p.high:.2f}): "
                f"{value:.1f} [{low:.1f}, {high:.1f}] on the profile's held-out calibration text "
                f"(dense {self.dense_ppl:.1f}){scaled}")


def prediction_view(profile: SensitivityProfile, allocation: UnitAllocation) -> PredictionView:
    """The predicted perplexity of an allocation (raises ValueError on other layer shapes)."""
    start = time.perf_counter()
    prediction = predict_kept(profile, allocation.groups_to_keep, allocation.channels_to_keep)
    return PredictionView(prediction, profile.base_ppl, (time.perf_counter() - start) * 1000)


def compute_profile_for(config, model: nn.Module, tokenizer,
                        progress: Callable[[int, int], None] | None = None
                        ) -> SensitivityProfile:
    """The profile a run of ``config`` would use (disk cache shared with the CLI)."""
    return sensitivity_profile(model, tokenizer, ProfileSettings.from_config(config),
                               model_id=config.base_model, progress=progress)


def heatmap(profile: SensitivityProfile) -> tuple[list[list[float]], list[str], list[int]]:
    """``(z, x, y)``: perplexity ratio ``exp(loss)`` of each layer (rows, y) cut alone at each
    MLP rate of the grid (columns, x labels in %), the effective curves the predictor uses."""
    z = [[math.exp(v) for v in effective(row, sigma)]
         for row, sigma in zip(profile.mlp_loss, profile.mlp_sigma)]
    return z, [f"{round(100 * r)} %" for r in profile.mlp_rates], list(range(profile.layers))


def group_costs(profile: SensitivityProfile) -> pd.DataFrame:
    """Per layer, the perplexity ratio when only that layer loses its k weakest GQA groups
    (k = 1 .. G-1), as the predictor uses them."""
    rows = []
    for layer, (losses, sigma) in enumerate(zip(profile.group_loss, profile.group_sigma)):
        curve = effective(losses, sigma)
        for removed in range(1, len(curve)):
            rows.append({"layer": layer, "groups removed": removed,
                         "perplexity x dense": math.exp(curve[removed]),
                         "loss increase (nats/token)": curve[removed]})
    return pd.DataFrame(rows)


def predicted_vs_measured(report: dict) -> pd.DataFrame:
    """One row per evaluated corpus: measured perplexity ratio after pruning and the
    predicted one with its range (empty without a prediction in the report)."""
    predicted = report.get("predicted")
    if not predicted:
        return pd.DataFrame()
    rows = []
    for corpus, after in report.get("ppl_after_pruning", {}).items():
        before = report["ppl_before"].get(corpus)
        if before:
            rows.append({"corpus": corpus, "measured x dense": after["value"] / before["value"],
                         "predicted x dense": predicted["ratio"],
                         "predicted low": predicted["low"], "predicted high": predicted["high"]})
    if not rows:
        rows.append({"corpus": "(not evaluated)", "measured x dense": float("nan"),
                     "predicted x dense": predicted["ratio"], "predicted low": predicted["low"],
                     "predicted high": predicted["high"]})
    return pd.DataFrame(rows)


def gate_curve(report: dict) -> pd.DataFrame:
    """The quality gate's steps by ratio: predicted and measured perplexity x dense (the
    geometric mean over the validation sources, and each source), whether it passed, and the
    search order. Empty for a run without the gate."""
    gate = report.get("gate")
    if not gate:
        return pd.DataFrame()
    rows = []
    for order, step in enumerate(gate["curve"], 1):
        measured = step["measured"]
        predicted = step["predicted"]  # inf: a ratio the schedule refused
        row = {"ratio %": 100 * step["ratio"],
               "predicted x dense": predicted if math.isfinite(predicted) else math.nan,
               "measured x dense": math.nan if measured is None else measured,
               "within the gate": "" if step["passed"] is None else
               ("yes" if step["passed"] else "no"),
               "step": order, "kind": "predicted" if measured is None else "measured"}
        row |= {f"{source} x dense": value
                for source, value in (step.get("by_source") or {}).items()}
        rows.append(row)
    return pd.DataFrame(rows).sort_values("ratio %", kind="stable", ignore_index=True)


def gate_summary(report: dict, asked: float) -> str:
    """One sentence: the gate, the ratio it chose (of ``asked`` at most), and on what text."""
    gate = report["gate"]
    measured = [s for s in gate["curve"] if s["measured"] is not None]
    sources = ", ".join(gate["dense"]) or "none"
    head = (f"Quality gate: perplexity at most x{gate['limit']:.3g} the dense model's on "
            f"validation documents carved from the calibration text ({sources}; never the "
            f"evaluation parts); {len(measured)} prune(s) measured. ")
    if gate["ratio"] <= 0:
        return head + ("No ratio measured stayed within the gate, so nothing was pruned: "
                       "allow a larger increase or ask for less.")
    chosen = next((s for s in measured if s["ratio"] == gate["ratio"]), None)
    at = "" if chosen is None else f", measured x{chosen['measured']:.3f}"
    return head + (f"Pruned at {gate['ratio']:.1%} (of {asked:.1%} asked at most{at}): the "
                   "largest measured ratio within the gate.")
