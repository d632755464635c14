"""Run the stages in order with progress callbacks and return a report; used by the CLI and app.

    load → calibration → layer importance → rates → whole units → evaluate before
         → score units and cut → evaluate after → [recover → evaluate recovered] → report

The optional recovery stage (``config.recovery``) distils the dense model into the pruned one
(see :mod:`gqaprune_core.recovery`); it is reported apart from the pruning: ``ppl_after`` is
always the final model's, ``ppl_after_pruning`` the pruned model's before recovery.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from gqaprune_core.compensate import prune_mlp_compensated_
from gqaprune_core.config import PruneConfig
from gqaprune_core.data import calibration_batch
from gqaprune_core.evaluate import PerplexityResult, evaluate_corpora
from gqaprune_core.layer_importance import LayerImportance, layer_importance, load_importance_config
from gqaprune_core.models import count_parameters, layout, load_model
from gqaprune_core.plan import PruningPlan
from gqaprune_core.pruner import prune_model_
from gqaprune_core.recovery import RecoveryReport, recover_
from gqaprune_core.rates import layer_rates
from gqaprune_core.schedule import UnitAllocation, UnitCost, allocate_units, unit_costs
from gqaprune_core.self_text import prompts_for, self_written, written_count
from gqaprune_core.sensitivity.gate import gate_search, held_out_name
from gqaprune_core.sensitivity.optimize import allocation_rates, optimize_units
from gqaprune_core.sensitivity.predict import predict_kept
from gqaprune_core.sensitivity.profile import ProfileSettings, SensitivityProfile
from gqaprune_core.sensitivity.store import sensitivity_profile
from gqaprune_core.surgery import apply_plan_, validate

# (stage, done, total); stages: load, importance, [sensitivity,] evaluate_before, prune,
# evaluate_after and, with recovery, recover and evaluate_recovered
Progress = Callable[[str, int, int], None]


@dataclass
class PipelineResult:
    """The pruned model and everything needed to report on it."""

    model: nn.Module
    tokenizer: object
    plan: PruningPlan
    importance: LayerImportance
    rates: list[float]
    allocation: UnitAllocation
    report: dict
    ppl_before: list[PerplexityResult] = field(default_factory=list)
    ppl_after: list[PerplexityResult] = field(default_factory=list)  # the final model's
    # the pruned model's before any recovery (without recovery: the same as ``ppl_after``)
    ppl_after_pruning: list[PerplexityResult] = field(default_factory=list)
    recovery: RecoveryReport | None = None


def prunable_parts(config: PruneConfig, costs: list[UnitCost]) -> list[int]:
    """Per layer, the parameters of the parts being pruned (attention and/or MLP)."""
    return [(c.attention if config.prune_attention else 0) + (c.mlp if config.prune_mlp else 0)
            for c in costs]


def prunable_target(config: PruneConfig, model: nn.Module, layer_range: range) -> float:
    """The requested ratio as a fraction of the prunable parameters (the parts being pruned)
    of the layers in range."""
    if config.ratio_of == "prunable":
        return config.pruning_ratio
    parts = prunable_parts(config, unit_costs(model))
    prunable = sum(parts[i] for i in layer_range)
    target = config.pruning_ratio * count_parameters(model) / prunable
    if target >= 1.0:
        raise ValueError(f"removing {config.pruning_ratio:.0%} of all parameters would need "
                         f"{target:.0%} of the prunable ones in layers {layer_range.start}.."
                         f"{layer_range.stop - 1}")
    return target


def plan_units(config: PruneConfig, model: nn.Module, importance: LayerImportance,
               profile: SensitivityProfile | None = None) -> tuple[list[float], UnitAllocation]:
    """Layer scores → per-layer rates → whole groups and channels per layer; with
    ``pruning_strategy="optimized"`` the units come from the sensitivity ``profile`` instead
    (required then; the rates reported are the shares each layer loses)."""
    shapes = layout(model)
    end = len(shapes) if config.layer_end is None else min(config.layer_end, len(shapes))
    if config.layer_start >= end:
        raise ValueError(f"layer range [{config.layer_start}, {config.layer_end}) holds none of "
                         f"the model's {len(shapes)} layers")
    costs = unit_costs(model)
    target = prunable_target(config, model, range(config.layer_start, end))
    if config.pruning_strategy == "optimized":
        return _optimized_units(config, profile, shapes, costs, target,
                                range(config.layer_start, end))
    rates = layer_rates(importance.scores, target, config.pruning_strategy, config.alpha,
                        config.min_pruning_rate, config.max_pruning_rate, config.layer_start, end,
                        weights=prunable_parts(config, costs))
    allocation = allocate_units(shapes, costs, rates, importance.scores,
                                prune_attention=config.prune_attention, prune_mlp=config.prune_mlp,
                                group_rounding=config.group_rounding,
                                channel_multiple=config.channel_multiple)
    return rates, allocation


def _optimized_units(config: PruneConfig, profile: SensitivityProfile | None, shapes, costs,
                     target: float, layer_range: range) -> tuple[list[float], UnitAllocation]:
    if profile is None:
        raise ValueError("pruning_strategy 'optimized' needs the sensitivity profile: compute "
                         "it first ('Compute sensitivity profile' in the app; run_pipeline "
                         "and the CLI compute or read it themselves)")
    parts = prunable_parts(config, costs)
    budget = target * sum(parts[i] for i in layer_range) if target > 0 else 0.0
    allocation = optimize_units(profile, shapes, costs, budget, layer_range,
                                config.prune_attention, config.prune_mlp,
                                config.channel_multiple, config.max_pruning_rate)
    rates = allocation_rates(allocation, shapes, costs, config.prune_attention, config.prune_mlp)
    return rates, allocation


def needs_profile(config: PruneConfig) -> bool:
    """Whether a run of ``config`` uses the sensitivity profile."""
    return config.pruning_strategy == "optimized" or config.max_ppl_increase is not None


def profile_for(config: PruneConfig, model: nn.Module, tokenizer,
                progress: Progress | None = None) -> SensitivityProfile:
    """The sensitivity profile ``config`` implies, from the disk cache or computed."""
    report = progress or (lambda stage, done, total: None)
    return sensitivity_profile(model, tokenizer, ProfileSettings.from_config(config),
                               model_id=config.base_model,
                               progress=lambda d, t: report("sensitivity", d, t))


def _timed(timings: dict, name: str):
    class Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 3)

    return Timer()


def run_pipeline(config: PruneConfig, model: nn.Module | None = None, tokenizer=None, *,
                 importance: LayerImportance | None = None,
                 importance_config: str | Path | None = None, copy_model: bool = True,
                 evaluate: bool = True, progress: Progress | None = None,
                 check_plan: Callable[[UnitAllocation], None] | None = None,
                 profile: SensitivityProfile | None = None) -> PipelineResult:
    """Prune according to ``config``.

    Args:
        model, tokenizer: an already loaded model; with ``copy_model`` (default) it is copied
            first, so a shared model (e.g. the app's cached one) is never cut in place.
        importance / importance_config: layer scores to reuse instead of computing them.
        profile: a sensitivity profile to reuse (else, when the strategy is ``optimized`` or
            the gate is on, it is read from the disk cache or computed: stage ``sensitivity``).

    With ``config.max_ppl_increase`` (the quality gate) everything is calibrated on the fit
    share of the calibration corpus (``NAME:fit``), :func:`gate_search` finds the largest ratio
    up to ``pruning_ratio`` whose measured perplexity on the held-out rest stays within the gate
    (stage ``gate``), the run takes the gate's own prune at that ratio (same settings, same
    data: ``report["gate"]["reused_prune"]``), and ``report["gate"]`` holds the curve.
        evaluate: measure perplexity before and after on ``config.eval_datasets`` (and, with
            recovery, again after it).
        check_plan: called with the unit allocation before any unit is scored or cut; it may
            raise to stop the run (the CLI refuses a plan that removes far less than asked).

    With ``config.recovery`` the dense model is kept as the teacher until recovery ends: the
    caller's model when it is copied anyway, else a copy taken before cutting (one more model
    in memory for the duration).
    """
    report_progress = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    if config.max_ppl_increase is not None:  # the gate validates on calibration text held out
        config = config.with_(calibration_dataset=held_out_name(config.calibration_dataset))
    teacher = None
    with _timed(timings, "load"):
        if model is None:
            model, tokenizer = load_model(config.base_model, config.device, config.dtype)
        elif copy_model:
            if config.recovery != "none":
                teacher = model  # the caller's model stays dense: it only needs reading
            model = copy.deepcopy(model)
        if config.recovery != "none" and teacher is None:
            teacher = copy.deepcopy(model)  # before anything is cut
    torch.manual_seed(config.seed)
    params_before = count_parameters(model)
    shapes_before = layout(model)
    with _timed(timings, "importance"):
        if importance is None and importance_config is not None:
            importance = load_importance_config(importance_config)
        if importance is None:
            importance = layer_importance(
                model, tokenizer, config.importance_method, config.calibration_dataset,
                config.importance_samples, config.importance_seq_len, config.seed,
                model_id=config.base_model,
                progress=lambda d, t: report_progress("importance", d, t),
                batch_size=32 if next(model.parameters()).is_cuda else 8)  # ~6x faster on GPU
    if len(importance.scores) != len(shapes_before):
        raise ValueError(f"layer importance has {len(importance.scores)} scores, model has "
                         f"{len(shapes_before)} layers")
    if profile is None and needs_profile(config):
        with _timed(timings, "sensitivity"):
            profile = profile_for(config, model, tokenizer, report_progress)
    gate = None
    if config.max_ppl_increase is not None:
        with _timed(timings, "gate"):
            gate = gate_search(config, model, tokenizer, importance, profile,
                               progress=lambda d, t: report_progress("gate", d, t))
        config = config.with_(pruning_ratio=gate.ratio)
    rates, allocation = plan_units(config, model, importance, profile)
    if check_plan is not None:
        check_plan(allocation)
    ppl_before = _evaluate(config, model, tokenizer, evaluate, timings, "evaluate_before",
                           report_progress)
    reused = gate is not None and gate.pruned is not None
    if not reused:
        with _timed(timings, "calibration"):
            calibration = prune_calibration(config, model, tokenizer, report_progress)
    with _timed(timings, "prune"):
        if reused:  # the gate pruned a copy at this very ratio with the same data
            plan = _take_pruned(model, gate.pruned)
            gate = replace(gate, pruned=None)  # its copy can go
        else:
            plan = _prune(config, model, calibration, allocation,
                          lambda d, t: report_progress("prune", d, t))
    ppl_after = _evaluate(config, model, tokenizer, evaluate, timings, "evaluate_after",
                          report_progress)
    ppl_after_pruning, recovery = ppl_after, None
    if config.recovery != "none":
        recovery = _recover(config, model, teacher, tokenizer, timings, report_progress)
        del teacher  # the dense copy is no longer needed (the caller's model stays theirs)
        ppl_after = _evaluate(config, model, tokenizer, evaluate, timings, "evaluate_recovered",
                              report_progress)
    report = build_report(config, model, params_before, plan, rates, allocation, ppl_before,
                          ppl_after, timings, ppl_after_pruning=ppl_after_pruning,
                          recovery=recovery)
    if gate is not None:
        report["gate"] = gate.to_dict() | {"reused_prune": reused}
    if profile is not None:
        report["predicted"] = predict_kept(profile, allocation.groups_to_keep,
                                           allocation.channels_to_keep).to_dict()
    return PipelineResult(model, tokenizer, plan, importance, rates, allocation, report,
                          ppl_before, ppl_after, ppl_after_pruning, recovery)


def prune_calibration(config: PruneConfig, model: nn.Module, tokenizer,
                      progress: Progress | None = None) -> torch.Tensor:
    """The prune stage's windows: ``num_examples`` real ones of the calibration corpus, then
    ``self_text_share`` as many written by ``model`` (dense: call it before any cut; prompts:
    ``self_text.prompts_for``), stage ``self_text``, read from the disk cache when written
    before."""
    real = calibration_batch(tokenizer, config.calibration_dataset, config.num_examples,
                             config.seq_len, config.seed)
    count = written_count(config.self_text_share, real.shape[0])
    if count == 0:
        return real
    report = progress or (lambda stage, done, total: None)
    written = self_written(model, prompts_for(real, tokenizer), count, config.seq_len,
                           config.seed, model_id=config.base_model,
                           progress=lambda d, t: report("self_text", d, t))
    return torch.cat([real, written])


def _prune(config: PruneConfig, model: nn.Module, calibration: torch.Tensor,
           allocation: UnitAllocation, progress) -> PruningPlan:
    if not config.compensate:
        return prune_model_(model, calibration, allocation.groups_to_keep,
                            allocation.channels_to_keep, config.unit_importance, config.mode,
                            config.seed, progress=progress)
    full_widths = [s.mlp_width for s in layout(model)]
    plan = prune_model_(model, calibration, allocation.groups_to_keep, full_widths,
                        config.unit_importance, config.mode, config.seed)
    return prune_mlp_compensated_(model, calibration, allocation.channels_to_keep,
                                  config.refit_ridge, base_plan=plan,
                                  feedback=config.refit_feedback,
                                  selection=config.channel_selection, progress=progress)


def _take_pruned(model: nn.Module, pruned: PipelineResult) -> PruningPlan:
    """Cut ``model`` in place to ``pruned``'s plan and give it ``pruned``'s weights (the same
    settings and data pruned a copy of it already: the quality gate's chosen step)."""
    apply_plan_(model, pruned.plan, check=False)
    model.load_state_dict(pruned.model.state_dict())
    validate(model)
    return pruned.plan


def _recover(config: PruneConfig, model: nn.Module, teacher: nn.Module, tokenizer,
             timings: dict, progress: Progress) -> RecoveryReport:
    """Distil ``teacher`` into the pruned ``model`` on calibration windows other than the
    pruning's (seed + 1), within the configured steps and time."""
    with _timed(timings, "recover"):
        tokens = calibration_batch(tokenizer, config.calibration_dataset, config.recovery_windows(),
                                   config.recovery_seq_len, config.seed + 1)
        report = recover_(model, teacher, tokens, method=config.recovery,
                          steps=config.recovery_steps, lr=config.recovery_lr,
                          batch_size=config.recovery_batch_size,
                          time_budget_s=config.recovery_time_s, seed=config.seed,
                          progress=lambda d, t: progress("recover", d, t))
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()  # the optimiser state and activations are gone; give them back
    return report


def _evaluate(config, model, tokenizer, enabled, timings, stage, progress):
    if not enabled or not config.eval_datasets:
        return []
    with _timed(timings, stage):
        return evaluate_corpora(model, tokenizer, config.eval_datasets, seq_len=config.eval_seq_len,
                                max_windows=config.max_eval_windows,
                                progress=lambda name, d, t: progress(stage, d, t))


def build_report(config: PruneConfig, model: nn.Module, params_before: int, plan: PruningPlan,
                 rates: list[float], allocation: UnitAllocation, ppl_before, ppl_after,
                 timings: dict, *, ppl_after_pruning=None,
                 recovery: RecoveryReport | None = None) -> dict:
    """The ``report.json`` contents (see the CLI's documentation).

    ``ppl_after`` is the final model's perplexity, ``ppl_after_pruning`` the pruned model's
    before recovery (without recovery the same; None: take ``ppl_after``). ``recovery``: what
    recovery did, what it cost and both perplexities by corpus (values only); None without it.
    """
    if ppl_after_pruning is None:
        ppl_after_pruning = ppl_after
    params_after = count_parameters(model)
    shapes_after = layout(model)
    layers = [{"layer": lp.layer, "rate": round(rate, 6), "q_heads_before": lp.q_heads_before,
               "kv_heads_before": lp.kv_heads_before, "q_heads": s.q_heads, "kv_heads": s.kv_heads,
               "mlp_before": lp.mlp_before, "mlp": s.mlp_width}
              for lp, s, rate in zip(plan.layers, shapes_after, rates)]
    return {
        "model": config.base_model,
        "params_before": params_before,
        "params_after": params_after,
        "ratio_requested": config.pruning_ratio,
        "ratio_of": config.ratio_of,
        "ratio_achieved_prunable": allocation.ratio_achieved,
        "ratio_achieved_total": (params_before - params_after) / params_before,
        "params_prunable": allocation.params_prunable,
        "ppl_before": {r.corpus: r.to_dict() for r in ppl_before},
        "ppl_after": {r.corpus: r.to_dict() for r in ppl_after},
        "ppl_after_pruning": {r.corpus: r.to_dict() for r in ppl_after_pruning},
        "recovery": None if recovery is None else {
            **recovery.to_dict(),
            "ppl_after_pruning": {r.corpus: r.value for r in ppl_after_pruning},
            "ppl_after_recovery": {r.corpus: r.value for r in ppl_after}},
        "timings_s": timings,
        "config": config.to_dict(),
        "layers": layers,
    }
