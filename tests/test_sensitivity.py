"""Sensitivity profiles, the predictor, the optimized schedule, on tiny seeded models."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from gqaprune_core import sensitivity  # noqa: F401  (the package imports)
from gqaprune_core.config import PruneConfig
from gqaprune_core.evaluate import window_nll
from gqaprune_core.models import count_parameters, decoder_layers, layout, load_model
from gqaprune_core.schedule import unit_costs
from gqaprune_core.sensitivity import store
from gqaprune_core.sensitivity.grams import fit_grams, held_grams
from gqaprune_core.sensitivity.optimize import optimize_units
from gqaprune_core.sensitivity.predict import (ABOVE, BELOW, compounding, mlp_loss, monotone,
                                               predict)
from gqaprune_core.sensitivity.cuts import MLP_RATES, layer_cuts
from gqaprune_core.sensitivity.profile import (ProfileSettings, SensitivityProfile, compute_profile,
                                               held_out_pass)
from gqaprune_core.surgery import cut_layer_

pytestmark = pytest.mark.usefixtures("one_thread")



def test_exact_profile_equals_cutting_that_layer_of_the_whole_model(make_tiny, profile_windows):
    model = make_tiny(layers=3)
    fit, ids = profile_windows
    settings = ProfileSettings(mode="exact")
    profile = compute_profile(model, fit, ids, settings)
    assert len(profile.mlp_loss) == 3 and len(profile.mlp_loss[0]) == len(MLP_RATES)
    assert [len(row) for row in profile.group_loss] == [2, 2, 2]
    assert all(row[0] == 0.0 for row in profile.mlp_loss + profile.group_loss)
    base = float(window_nll(model, ids).sum()) / (ids.shape[0] * (ids.shape[1] - 1))
    assert profile.base_loss == pytest.approx(base, rel=1e-5)
    # re-do two grid points by cutting a copy of the whole model and a full forward pass
    held = held_out_pass(model, ids)
    cuts = layer_cuts(layout(model)[1], decoder_layers(model)[1], list(fit_grams(model, fit))[1],
                      held, settings, _saliency(model, fit)[1])
    for cut in (cuts[4], cuts[-1]):  # 50 % of the MLP with its re-fit; one group
        pruned = copy.deepcopy(model)
        layer = decoder_layers(pruned)[1]
        cut_layer_(layer, cut.plan)
        if cut.down is not None:
            layer.mlp.down_proj.weight.data.copy_(cut.down)
        loss = float(window_nll(pruned, ids).sum()) / (ids.shape[0] * (ids.shape[1] - 1))
        table = profile.mlp_loss if cut.part == "mlp" else profile.group_loss
        assert table[1][cut.step] == pytest.approx(loss - base, abs=1e-5)


def _whole_pass_grams(model, ids):
    """Per layer the Gram of the MLP activations from one whole-model forward (hooks)."""
    grams = {}

    def hook(index):
        def add(module, args):
            h = module.act_fn(module.gate_proj(args[0])) * module.up_proj(args[0])
            h = h.reshape(-1, h.shape[-1]).double()
            grams[index] = grams.get(index, 0) + h.T @ h
        return add

    handles = [layer.mlp.register_forward_pre_hook(hook(i))
               for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        for batch in ids.split(4):
            model.model(batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return grams


@pytest.mark.parametrize("variant", ["llama", "qwen2_bias"])
def test_grams_made_layer_by_layer_equal_a_whole_model_pass(make_tiny, profile_windows, variant):
    model = make_tiny(variant, layers=3)
    fit, ids = profile_windows  # 6 fit windows in batches of 4: a full and a partial batch
    whole = _whole_pass_grams(model, fit)
    streamed = fit_grams(model, fit, batch_size=4)
    assert not isinstance(streamed, (list, dict))  # a generator: one layer's Gram at a time
    streamed = list(streamed)
    assert len(streamed) == 3
    for index, gram in enumerate(streamed):
        assert gram.dtype == torch.float64
        torch.testing.assert_close(gram, whole[index], rtol=1e-5, atol=1e-6)
    held = held_out_pass(model, ids)
    for index, layer in enumerate(decoder_layers(model)):
        mlp, attn = held_grams(layer, held.calls[index])
        torch.testing.assert_close(mlp.double(), _whole_pass_grams(model, ids)[index],
                                   rtol=1e-5, atol=1e-5)
        assert attn.shape == (layer.self_attn.o_proj.in_features,) * 2


def _saliency(model, fit):
    from gqaprune_core.unit_importance import layer_saliency
    return layer_saliency(model, "taylor", fit[:8])


def test_anchored_profile_measures_the_anchors_and_scales_the_rest(make_tiny, profile_windows):
    model = make_tiny(layers=2)
    fit, ids = profile_windows
    exact = compute_profile(model, fit, ids, ProfileSettings(mode="exact"))
    anchored = compute_profile(model, fit, ids, ProfileSettings(mode="anchored"))
    for layer in range(2):
        assert anchored.measured[layer] == ("mlp:5", "group:1")
        assert anchored.mlp_loss[layer][5] == pytest.approx(exact.mlp_loss[layer][5])
        assert anchored.group_loss[layer][1] == pytest.approx(exact.group_loss[layer][1])
        scale = max(anchored.mlp_loss[layer][5], 0) / anchored.mlp_error[layer][5]
        assert anchored.mlp_loss[layer][2] == pytest.approx(scale * anchored.mlp_error[layer][2])
        errors = anchored.mlp_error[layer]
        assert all(b >= a - 1e-9 for a, b in zip(errors, errors[1:]))  # more cut, more change


def test_profile_is_cached_and_missed_on_other_weights(tiny_tokenizer, make_tiny, tmp_path,
                                                       monkeypatch):
    model = make_tiny(layers=2)
    settings = ProfileSettings(fit_samples=4, fit_seq_len=24, samples=3, seq_len=16)
    first = store.sensitivity_profile(model, tiny_tokenizer, settings, "tiny",
                                      cache_root=tmp_path)
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the profile should have come from the cache")

    monkeypatch.setattr(store, "compute_profile", refuse)
    again = store.sensitivity_profile(model, tiny_tokenizer, settings, "tiny",
                                      cache_root=tmp_path)
    assert again == first
    with torch.no_grad():
        decoder_layers(model)[0].mlp.down_proj.weight.mul_(0.5)
    with pytest.raises(AssertionError, match="from the cache"):
        store.sensitivity_profile(model, tiny_tokenizer, settings, "tiny", cache_root=tmp_path)


def test_profile_windows_measure_on_documents_the_fit_never_saw(tiny_tokenizer, tmp_path):
    from gqaprune_core.data import fit_and_validation, tokenize_documents

    settings = ProfileSettings(corpus="pydoc", fit_samples=4, fit_seq_len=32, samples=3,
                               seq_len=24)
    fit, ids = store.profile_windows(tiny_tokenizer, settings)
    fit_corpus, held = fit_and_validation("pydoc")

    def inside(rows, documents):
        text = tokenize_documents(tiny_tokenizer, documents).tolist()
        joined = ",".join(map(str, text))
        return all(",".join(map(str, row.tolist())) in joined for row in rows)

    assert inside(fit, fit_corpus.calibration) and inside(ids, held.calibration)
    assert not inside(ids[:1], fit_corpus.calibration)
    # one calibration document cannot be split: the profile falls back to one part
    single = tmp_path / "two.txt"
    single.write_text("a single long document, " * 40 + "\n\n" + "and the evaluation one " * 9)
    fit, ids = store.profile_windows(tiny_tokenizer, settings.__class__(
        corpus=str(single), fit_samples=2, fit_seq_len=16, samples=2, seq_len=16))
    assert fit.shape == (2, 16) and ids.shape == (2, 16)
    # nor can a validation share shorter than a window
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(["long calibration text, " * 40] * 3 + ["tiny."] * 2
                                   + ["evaluation " * 9] * 5))
    fit, ids = store.profile_windows(tiny_tokenizer, settings.__class__(
        corpus=str(short), fit_samples=2, fit_seq_len=16, samples=2, seq_len=64))
    assert ids.shape == (2, 64)


def test_damaged_cache_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        store.load_profile(path)


def synthetic(layers: int = 3, width: int = 40, groups: int = 2, seed: int = 0
              ) -> SensitivityProfile:
    """A profile with increasing, layer-dependent random losses."""
    generator = torch.Generator().manual_seed(seed)
    mlp, grp = [], []
    for _ in range(layers):
        steps = torch.rand(len(MLP_RATES) - 1, generator=generator).tolist()
        mlp.append(tuple([0.0] + list(itertools.accumulate(s * 0.05 for s in steps))))
        grp.append(tuple([0.0] + [0.2 * (k + 1) * float(torch.rand(1, generator=generator))
                                  for k in range(groups - 1)]))
    zeros = tuple(tuple(0.0 for _ in row) for row in mlp)
    gzeros = tuple(tuple(0.0 for _ in row) for row in grp)
    return SensitivityProfile(MLP_RATES, tuple(mlp), zeros, tuple(grp), gzeros,
                              (width,) * layers, (groups,) * layers, 2.0, 100, "exact")


def test_a_cut_measured_within_noise_of_zero_is_not_free():
    profile = synthetic()
    noisy = SensitivityProfile(**(profile.__dict__ | {
        "mlp_loss": ((0.0,) + (-0.01,) * 9,) + profile.mlp_loss[1:],
        "mlp_sigma": ((0.0,) + (0.004,) * 9,) + profile.mlp_sigma[1:]}))
    assert mlp_loss(noisy, 0, 20)[0] == pytest.approx(0.004)  # one standard error, not < 0


def test_prediction_is_additive_and_monotone():
    profile = synthetic()
    nothing = predict(profile, [0, 0, 0], [0, 0, 0])
    assert nothing.ratio == 1.0 and nothing.sigma == 0.0
    one = predict(profile, [0, 0, 0], [0, 20, 0])
    assert one.loss_increase == pytest.approx(monotone(profile.mlp_loss[1])[5])
    both = predict(profile, [1, 0, 0], [0, 20, 0])
    assert both.loss_increase == pytest.approx(one.loss_increase + profile.group_loss[0][1])
    assert both.low < both.ratio < both.high
    assert both.sigma == 0.0  # the synthetic profile has no sampling error: model error only
    assert math.log(both.high) == pytest.approx((1 + ABOVE) * both.loss_increase)
    assert math.log(both.low) == pytest.approx((1 - BELOW) * both.loss_increase)
    assert mlp_loss(profile, 0, 6)[0] == pytest.approx(
        0.5 * (profile.mlp_loss[0][1] + profile.mlp_loss[0][2]))  # 15 %: halfway
    with pytest.raises(ValueError, match="cannot remove 2 of 2 groups"):
        predict(profile, [2, 0, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="need 3 group"):
        predict(profile, [0], [0])


def test_the_probe_scales_the_additive_sum_by_how_losses_compounded():
    profile = synthetic()  # width 40: the probe at 30 % removes 12 channels per layer
    additive = sum(mlp_loss(profile, layer, 12)[0] for layer in range(3))
    probed = SensitivityProfile(**(profile.__dict__ | {
        "probe_rate": 0.3, "probe_loss": 2.5 * additive, "probe_sigma": 0.01}))
    assert compounding(profile) == 1.0  # no probe, no scaling
    assert compounding(probed) == pytest.approx(2.5)
    plain, scaled = (predict(p, [1, 0, 0], [0, 20, 4]) for p in (profile, probed))
    assert scaled.loss_increase == pytest.approx(2.5 * plain.loss_increase)
    assert scaled.per_layer == plain.per_layer and scaled.compounding == pytest.approx(2.5)
    assert scaled.to_dict()["additive"] == pytest.approx(plain.loss_increase, abs=1e-6)
    # the probe's own schedule is predicted as measured
    assert predict(probed, [0, 0, 0], [12] * 3).loss_increase == pytest.approx(2.5 * additive)


@pytest.mark.parametrize("feedback", [0.0, 0.5])
def test_the_probe_measures_every_layer_cut_at_once_with_sequential_refit(make_tiny, profile_windows,
                                                                          feedback):
    from gqaprune_core.compensate import prune_mlp_compensated_

    model = make_tiny(layers=3)
    fit, ids = profile_windows
    profile = compute_profile(model, fit, ids, ProfileSettings(mode="anchored",
                                                               refit_feedback=feedback))
    assert profile.probe_rate == 0.3
    # the same schedule by the in-memory pipeline's sequential re-fit (one batch of all fit
    # windows; the probe sums batches of 8: equal up to rounding), measured on the same windows,
    # with the pipeline's feedback toward the dense model's residual stream when it has one
    pruned = copy.deepcopy(model)
    widths = [s.mlp_width for s in layout(model)]
    prune_mlp_compensated_(pruned, fit, [w - round(0.3 * w) for w in widths], ridge=0.1,
                           feedback=feedback)
    positions = ids.shape[0] * (ids.shape[1] - 1)
    expected = (float(window_nll(pruned, ids).sum()) - float(window_nll(model, ids).sum())) / positions
    assert profile.probe_loss == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert profile.probe_sigma > 0
    if feedback:  # the feedback changed what the probe measured
        plain = compute_profile(model, fit, ids, ProfileSettings(mode="anchored"))
        assert abs(plain.probe_loss - profile.probe_loss) > 1e-4 * abs(plain.probe_loss)
    assert compute_profile(model, fit, ids, ProfileSettings(probe_rate=0.0)).probe_rate == 0.0


def _brute_force(profile, shapes, costs, budget, block):
    best = math.inf
    per_layer = [[(g, c) for g in range(s.kv_heads)
                  for c in range(0, int(0.9 * s.mlp_width) // block * block + 1, block)]
                 for s in shapes]
    for combo in itertools.product(*per_layer):
        removed = sum(g * k.group + c * k.channel for (g, c), k in zip(combo, costs))
        if abs(removed - budget) <= block * costs[0].channel / 2:
            loss = predict(profile, [g for g, _ in combo], [c for _, c in combo]).loss_increase
            best = min(best, loss)
    return best


def test_optimizer_finds_the_least_predicted_loss_at_the_budget(make_tiny):
    model = make_tiny(layers=3)
    shapes, costs = layout(model), unit_costs(model)
    profile = synthetic()
    prunable = sum(c.attention + c.mlp for c in costs)
    for share in (0.1, 0.3):
        budget = share * prunable
        allocation = optimize_units(profile, shapes, costs, budget, range(3),
                                    channel_multiple=4)
        assert allocation.budget_met
        assert abs(allocation.params_removed - budget) <= 2 * costs[0].channel
        got = predict(profile, [s.kv_heads - g for s, g in zip(shapes, allocation.groups_to_keep)],
                      [s.mlp_width - k for s, k in zip(shapes, allocation.channels_to_keep)])
        assert got.loss_increase <= _brute_force(profile, shapes, costs, budget, 4) + 1e-9


def test_optimizer_respects_parts_and_range(make_tiny):
    model = make_tiny(layers=3)
    shapes, costs = layout(model), unit_costs(model)
    profile = synthetic()
    budget = 0.2 * sum(c.mlp for c in costs[1:])
    allocation = optimize_units(profile, shapes, costs, budget, range(1, 3),
                                prune_attention=False)
    assert allocation.groups_to_keep == (2, 2, 2)
    assert allocation.channels_to_keep[0] == 40 and allocation.budget_met
    zero = optimize_units(profile, shapes, costs, 0.0, range(3))
    assert zero.params_removed == 0
    with pytest.raises(ValueError, match="recompute it"):
        optimize_units(synthetic(width=32), shapes, costs, budget, range(3))


def test_optimized_strategy_runs_in_the_pipeline_and_reports_a_prediction(tmp_path, monkeypatch):
    from gqaprune_core.pipeline import run_pipeline

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    model, tokenizer = load_model("tiny", device="cpu")
    config = PruneConfig(base_model="tiny", pruning_strategy="optimized", pruning_ratio=0.3,
                         importance_samples=4, importance_seq_len=16, num_examples=6,
                         seq_len=24, sensitivity_samples=3, sensitivity_seq_len=16,
                         sensitivity_fit_samples=4, compensate=True, mode="one-shot",
                         min_pruning_rate=0.0, max_pruning_rate=0.9)
    result = run_pipeline(config, model, tokenizer, evaluate=False)
    assert result.allocation.budget_met
    assert abs(result.report["ratio_achieved_prunable"] - 0.3) <= 0.005
    assert result.report["predicted"]["ratio"] >= 1.0
    assert "sensitivity" in result.report["timings_s"]
    assert list((tmp_path / "sensitivity").glob("*.json"))
    assert count_parameters(result.model) < count_parameters(model)


def test_sensitivity_settings_are_checked():
    with pytest.raises(ValueError, match="max_ppl_increase=0"):
        PruneConfig(max_ppl_increase=0.0)
    with pytest.raises(ValueError, match="naive-heads"):
        PruneConfig(pruning_strategy="optimized", unit_importance="naive-heads")
    with pytest.raises(ValueError, match="sensitivity mode='rough'"):
        ProfileSettings(mode="rough")


def test_quality_gate_keeps_the_measured_perplexity_within_the_limit(tmp_path, monkeypatch):
    from gqaprune_core import pipeline
    from gqaprune_core.pipeline import run_pipeline

    real_prune = pipeline._prune

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path))
    model, tokenizer = load_model("tiny", device="cpu")
    base = PruneConfig(base_model="tiny", pruning_ratio=0.5, importance_samples=4,
                       importance_seq_len=16, num_examples=6, seq_len=24, sensitivity_samples=3,
                       sensitivity_seq_len=16, sensitivity_fit_samples=4, compensate=True,
                       prune_attention=False, mode="one-shot", min_pruning_rate=0.0,
                       max_pruning_rate=0.9, calibration_dataset="demo")
    prunes = []
    monkeypatch.setattr(pipeline, "_prune", lambda *a, **k: prunes.append(1) or real_prune(*a, **k))
    loose = run_pipeline(base.with_(max_ppl_increase=100.0), model, tokenizer, evaluate=False)
    gate = loose.report["gate"]
    assert gate["ratio"] == 0.5 and gate["validation"] == "demo:fit"
    assert [s["passed"] for s in gate["curve"] if s["measured"] is not None] == [True]
    # the run took the gate's prune at 0.5 instead of pruning a second time: the same weights
    assert gate["reused_prune"] and len(prunes) == 1
    again = run_pipeline(base.with_(calibration_dataset="demo:fit"), model, tokenizer,
                         evaluate=False).model.state_dict()
    final = loose.model.state_dict()
    assert final.keys() == again.keys()
    assert all(torch.equal(final[name], again[name]) for name in final)
    tight = run_pipeline(base.with_(max_ppl_increase=1e-4), model, tokenizer,
                         evaluate=False).report["gate"]
    measured = [s for s in tight["curve"] if s["measured"] is not None]
    assert 1 <= len(measured) <= 4 and tight["ratio"] < 0.5
    assert all(s["measured"] <= tight["limit"] for s in measured if s["passed"])
    assert all(s["ratio"] <= tight["ratio"] for s in measured if s["passed"])
    assert tight["ratio"] == max([0.0] + [s["ratio"] for s in measured if s["passed"]])
    assert tight["reused_prune"] == (tight["ratio"] > 0)  # nothing passed: nothing to take


def test_fit_share_and_validation_never_overlap():
    from gqaprune_core.data import load_corpus

    whole, fit = load_corpus("demo"), load_corpus("demo:fit")
    assert set(fit.calibration) | set(fit.evaluation) == set(whole.calibration)
    assert not set(fit.calibration) & set(fit.evaluation)
    assert not set(fit.evaluation) & set(whole.evaluation)
    assert len(fit.evaluation) == round(0.3 * len(whole.calibration))


def test_cli_flags_reach_the_config():
    from gqaprune_core.cli_flags import build_parser, config_from_args

    args = build_parser().parse_args(["--preset", "default", "--pruning_strategy", "optimized",
                                      "--max_ppl_increase", "0.25", "--sensitivity_mode",
                                      "exact", "--sensitivity_samples", "4"])
    config = config_from_args(args)
    assert (config.pruning_strategy, config.max_ppl_increase, config.sensitivity_mode,
            config.sensitivity_samples) == ("optimized", 0.25, "exact", 4)


def test_cli_runs_the_optimized_strategy_with_the_gate(tmp_path, monkeypatch):
    from gqaprune_core.cli import execute

    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    run = execute(["--base_model", "tiny", "--pruning_strategy", "optimized", "--prune_mlp",
                   "--pruning_ratio", "0.3", "--min_pruning_rate", "0", "--max_pruning_rate",
                   "0.9", "--importance_samples", "4", "--importance_seq_len", "16",
                   "--num_examples", "4", "--seq_len", "24", "--sensitivity_samples", "3",
                   "--sensitivity_seq_len", "16", "--sensitivity_fit_samples", "4",
                   "--max_ppl_increase", "100", "--output_dir", str(tmp_path / "runs"),
                   "--save_ckpt_log_name", "opt", "--quiet"])
    report = run.report
    assert report["gate"]["ratio"] == 0.3 and report["predicted"]["ratio"] >= 1.0
    assert (tmp_path / "runs" / "opt" / "report.json").is_file()


def test_gate_view_sorts_the_curve_and_says_when_nothing_passed():
    from gqaprune_core.sensitivity.app_view import gate_curve, gate_summary

    steps = [{"ratio": 0.3, "predicted": 1.5, "measured": None, "by_source": None, "passed": None},
             {"ratio": 0.5, "predicted": math.inf, "measured": None, "by_source": None,
              "passed": None},
             {"ratio": 0.15, "predicted": 1.2, "measured": 1.4,
              "by_source": {"demo:fit": 1.4}, "passed": False}]
    report = {"gate": {"limit": 1.25, "ratio": 0.0, "validation": "demo:fit",
                       "dense": {"demo:fit": 30.0}, "curve": steps}}
    curve = gate_curve(report)
    assert list(curve["ratio %"]) == [15.0, 30.0, 50.0] and list(curve["step"]) == [3, 1, 2]
    assert list(curve["kind"]) == ["measured", "predicted", "predicted"]
    assert math.isnan(curve["predicted x dense"].iloc[2])  # refused by the schedule
    assert curve["demo:fit x dense"].iloc[0] == 1.4 and curve["within the gate"].iloc[0] == "no"
    assert "nothing was pruned" in gate_summary(report, 0.3)
    passed = {**report["gate"], "ratio": 0.15,
              "curve": [steps[0], {**steps[2], "measured": 1.2, "passed": True}]}
    assert "Pruned at 15.0% (of 30.0% asked at most, measured x1.200)" in gate_summary(
        {"gate": passed}, 0.3)
    assert gate_curve({}).empty
