"""The staged pipeline on the tiny model: presets, budgets, the report, no in-place cut."""

from __future__ import annotations

import pytest
import torch

from gqaprune_core.config import PRESETS, PruneConfig
from gqaprune_core.models import count_parameters, layout, load_model
from gqaprune_core.pipeline import run_pipeline

# channel_multiple 1: the tiny model's 40-channel MLPs in blocks of 8 (the default preset's) are
# too coarse to meet a budget within 0.5 %
SMALL = {"base_model": "tiny", "importance_samples": 4, "importance_seq_len": 16,
         "num_examples": 6, "seq_len": 24, "eval_seq_len": 32, "max_eval_windows": 2,
         "channel_multiple": 1}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_meet_the_budget_and_report_real_shapes(tiny, preset):
    model, tokenizer = tiny
    params = count_parameters(model)
    config = PRESETS[preset].with_(**SMALL, pruning_ratio=0.3, ratio_of="prunable")
    result = run_pipeline(config, model, tokenizer, evaluate=False)
    report = result.report
    assert report["params_after"] == count_parameters(result.model)
    assert abs(report["ratio_achieved_prunable"] - result.allocation.ratio_requested) <= 0.005
    shapes = layout(result.model)
    assert [entry["kv_heads"] for entry in report["layers"]] == [s.kv_heads for s in shapes]
    assert [entry["mlp"] for entry in report["layers"]] == [s.mlp_width for s in shapes]
    assert all(s.q_per_kv == 3 for s in shapes)
    assert count_parameters(model) == params and layout(model)[0].mlp_width == 40  # untouched


def test_total_ratio_removes_that_share_of_all_parameters(tiny):
    model, tokenizer = tiny
    config = PRESETS["default"].with_(**SMALL, pruning_ratio=0.1, ratio_of="total")
    result = run_pipeline(config, model, tokenizer, evaluate=False)
    assert result.report["ratio_achieved_total"] == pytest.approx(0.1, abs=0.005)
    assert all(e["kv_heads"] == e["kv_heads_before"] for e in result.report["layers"])


def test_evaluation_and_timings_are_reported(tiny):
    model, tokenizer = tiny
    result = run_pipeline(PruneConfig(**SMALL, pruning_ratio=0.3, min_pruning_rate=0.0),
                          model, tokenizer)
    assert set(result.report["ppl_before"]) == {"demo", "pydoc"}
    entry = result.report["ppl_after"]["demo"]
    assert entry["seq_len"] == 32 and entry["tokens"] == 62 and entry["value"] > 1
    assert {"importance", "prune", "evaluate_before", "evaluate_after"} <= set(
        result.report["timings_s"])


def test_compensated_pipeline_is_closer_to_dense_than_plain(tiny):
    model, tokenizer = tiny
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dense = model(ids).logits
    errors = {}
    for compensate in (False, True):
        config = PruneConfig(**SMALL, pruning_ratio=0.4, min_pruning_rate=0.0,
                             prune_attention=False, compensate=compensate,
                             calibration_dataset="demo")
        pruned = run_pipeline(config, model, tokenizer, evaluate=False).model
        with torch.no_grad():
            errors[compensate] = (pruned(ids).logits - dense).pow(2).mean().item()
    assert errors[True] < errors[False]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="min_pruning_rate \\(0.6\\)"):
        PruneConfig(min_pruning_rate=0.6, max_pruning_rate=0.5)
    with pytest.raises(ValueError, match="mode='fast'"):
        PruneConfig(mode="fast")
