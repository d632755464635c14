"""The Streamlit app through AppTest, on the tiny model with tiny sample counts.

Jobs run synchronously here (``JOBS.synchronous``), so a click returns with the job done; the
background thread itself is covered by the JobRegistry tests and by tests/test_browser.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from gqaprune_core import app_rates, app_support, jobs
from gqaprune_core.app_support import head_mapping
from gqaprune_core.jobs import JobRegistry
from gqaprune_core.config import PRESETS
from gqaprune_core.models import count_parameters, layout, load_model

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ("1_model", "2_gqa_structure", "3_layer_importance", "4_rate_tuning", "5_prune",
         "6_export")


@pytest.fixture
def app(monkeypatch, tmp_path) -> AppTest:
    """A fresh app session on the tiny model; caches and saved runs go to ``tmp_path``."""
    monkeypatch.setenv("GQAPRUNE_APP_MODEL", "tiny")
    monkeypatch.setenv("GQAPRUNE_APP_QUICK", "1")
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # Export writes under ./prune_log
    monkeypatch.setattr(jobs.JOBS, "synchronous", True)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    return at


def open_page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, label: str) -> AppTest:
    buttons = [b for b in at.button if b.label == label]
    assert buttons, f"no button {label!r}; have {[b.label for b in at.button]}"
    buttons[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def rate_bars(at: AppTest) -> list[float]:
    for spec in chart_specs(at):
        for trace in spec["data"]:
            if trace.get("type") == "bar" and str(trace.get("name")).startswith("planned rate"):
                return list(trace["y"])
    raise AssertionError("no planned-rate bars in any chart")


def split_bars(at: AppTest) -> dict[str, list[int]]:
    """The stacked bars of parameters removed per layer, by part name (attention, MLP)."""
    for spec in chart_specs(at):
        bars = {str(t["name"]).split(":")[0]: list(t["y"]) for t in spec["data"]
                if t.get("type") == "bar"}
        if {"attention (GQA groups)", "MLP channels"} <= set(bars):
            return bars
    raise AssertionError("no attention/MLP split chart")


def use_preset(at: AppTest, name: str) -> AppTest:
    at.selectbox(key="tune_preset_choice").set_value(name).run()
    return click(at, "Apply preset")


def texts(at: AppTest) -> str:
    parts = [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.success]
    return "\n".join(str(p.value) for p in parts)


def test_every_page_renders_without_errors(app):
    assert "gqaprune" in [t.value for t in app.title]
    for name in PAGES:
        open_page(app, name)
        assert not app.error, [e.value for e in app.error]
    assert "tiny" in "\n".join(m.value for m in app.sidebar.markdown)


def test_model_page_loads_and_shows_the_architecture(app):
    open_page(app, "1_model")
    assert app.radio(key="model_kind").value == "tiny"
    click(app, "Load model")
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["layers"] == "3" and metrics["query heads"] == "6"
    assert metrics["KV heads"] == "2" and metrics["q_per_kv"] == "3"
    components = app.dataframe[0].value
    assert {"embeddings", "attention", "mlp", "norms", "total"} <= set(components["component"])


def test_model_page_reports_a_wrong_path_as_a_message(app, tmp_path):
    open_page(app, "1_model")
    app.radio(key="model_kind").set_value("hf").run()
    app.text_input(key="model_path_hf").input(str(tmp_path / "missing")).run()
    click(app, "Load model")
    assert any("does not exist" in e.value for e in app.error), [e.value for e in app.error]


def test_a_hugging_face_directory_replaces_the_model_everywhere(app, tmp_path):
    from gqaprune_core.tiny import char_tokenizer, tiny_model

    directory = tmp_path / "hf-model"
    tiny_model(layers=4).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    assert len(rate_bars(app)) == 3
    open_page(app, "1_model")
    app.radio(key="model_kind").set_value("hf").run()
    app.text_input(key="model_path_hf").input(str(directory)).run()
    click(app, "Load model")
    assert {m.label: m.value for m in app.metric}["layers"] == "4"
    assert str(directory) in "\n".join(m.value for m in app.sidebar.markdown)
    open_page(app, "4_rate_tuning")  # scores and settings belong to the previous model
    assert "there are none yet for this model" in texts(app)
    click(app, "Compute layer importance")
    assert len(rate_bars(app)) == 4


def test_a_layerwise_run_says_where_its_fisher_pass_kept_its_hidden_states(app, tmp_path,
                                                                           monkeypatch):
    """With 1 KiB of free memory nothing fits: the run streams, and the Fisher scores' store
    of hidden states (a few KiB here) goes to disk, and the page says so."""
    from gqaprune_core.layerwise import pipeline as layerwise_pipeline
    from gqaprune_core.tiny import char_tokenizer, tiny_model

    directory = tmp_path / "hf-model"
    tiny_model().save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    open_page(app, "1_model")
    app.radio(key="model_kind").set_value("hf").run()
    app.text_input(key="model_path_hf").input(str(directory)).run()
    click(app, "Load model")
    monkeypatch.setattr(layerwise_pipeline, "free_memory", lambda device: 2**10)
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    run = app.session_state["runs"][0]
    assert run.model is None and run.config.channel_selection == "energy+fisher"
    shown = texts(app)
    assert "Pruned layer by layer from disk: MLP channels were chosen by energy+fisher (the " in shown
    assert ("KiB of hidden states for its backward pass, more than half of the 1.0 KiB of free "
            f"host memory, kept on disk under {run.checkpoint.parent}") in shown
    assert not list(run.checkpoint.parent.glob(".gqaprune-fisher-*"))  # removed after


def test_gqa_page_contrasts_naive_and_group_pruning(app):
    open_page(app, "2_gqa_structure")
    assert app.toggle(key="gqa_compare").value
    assert "query heads read a KV head they were not trained with" in texts(app)
    # removing exactly group 0's query heads is group pruning: nothing breaks
    app.multiselect(key="gqa_naive_0_0").set_value([0, 1, 2]).run()
    assert "happens to equal group pruning" in texts(app)
    click(app, "Compute group scores")
    heatmaps = [s for s in chart_specs(app) if s["data"][0].get("type") == "heatmap"]
    assert heatmaps and len(heatmaps[0]["data"][0]["z"]) == 3  # one row per layer


def test_layer_importance_is_computed_once_then_read_from_the_disk_cache(app, tmp_path):
    open_page(app, "3_layer_importance")
    click(app, "Compute layer importance")
    first = app.session_state["importance"][("tiny", "auto", "auto")]
    assert len(first.scores) == 3
    assert list((tmp_path / "cache" / "importance").glob("*.json"))
    again = AppTest.from_file(APP, default_timeout=60)  # a new session, same disk cache
    again.run()
    open_page(again, "3_layer_importance")
    click(again, "Compute layer importance")
    assert again.session_state["importance"][("tiny", "auto", "auto")].scores == first.scores
    assert "read from the disk cache" in texts(again)
    assert "read from the disk cache" not in texts(app)


def test_the_app_starts_from_the_recommended_preset_and_splits_the_budget(app):
    start = PRESETS[app_support.START_PRESET]
    assert app_support.START_PRESET == "default" and app.session_state["preset"] == "default"
    open_page(app, "4_rate_tuning")
    assert "there are none yet" in texts(app) and "block_influence" in texts(app)
    click(app, "Compute layer importance")
    importance = app.session_state["importance"][("tiny", "auto", "auto")]
    assert importance.method == start.importance_method == "block_influence"
    assert app.selectbox(key="tune_preset_choice").value == "default"
    assert app.slider(key="tune_ratio").value == pytest.approx(start.pruning_ratio)
    assert app.radio(key="tune_ratio_of").value == start.ratio_of == "total"
    assert app.slider(key="tune_alpha").value == pytest.approx(start.alpha)
    assert app.slider(key="tune_max").value == pytest.approx(start.max_pruning_rate)
    assert app.toggle(key="tune_attention").value is start.prune_attention is False
    assert app.toggle(key="tune_mlp").value is True
    # MLP channels only: the whole budget comes from the MLP
    metrics = {m.label: m for m in app.metric}
    assert metrics["removed from attention"].value == "0"
    assert metrics["removed from the MLP"].delta.startswith("100.0% of removed")
    bars = split_bars(app)
    assert bars["attention (GQA groups)"] == [0, 0, 0] and min(bars["MLP channels"]) > 0
    # with attention on as well, part of a larger budget goes to whole groups
    app.toggle(key="tune_attention").set_value(True).run()
    app.slider(key="tune_ratio").set_value(0.45).run()
    assert not app.warning, [w.value for w in app.warning]
    model, _ = load_model("tiny", device="cpu")  # seeded: the app's model
    split = app_rates.rate_preview(
        start.with_(base_model="tiny", pruning_ratio=0.45, prune_attention=True), model,
        importance).split
    bars = split_bars(app)
    assert bars["attention (GQA groups)"] == list(split.attention) and split.attention_total > 0
    assert bars["MLP channels"] == list(split.mlp)
    shares = {m.label: m.delta for m in app.metric}
    assert shares["removed from attention"].startswith(f"{split.attention_share:.1%} of removed")
    assert shares["removed from the MLP"].startswith(f"{split.mlp_share:.1%} of removed")


def test_rate_tuning_redraws_on_slider_moves_and_warns_on_impossible_settings(app):
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    before = rate_bars(app)
    assert len(before) == 3
    app.slider(key="tune_ratio").set_value(0.25).run()  # of all: 65.6 % of the tiny MLPs
    after = rate_bars(app)
    assert after != before and sum(after) > sum(before)
    tuned = app.session_state["tuning"][("tiny", "auto", "auto")]
    assert tuned["pruning_ratio"] == pytest.approx(0.25)
    app.slider(key="tune_min").set_value(0.8).run()  # min above max (0.7)
    assert any("min" in w.value for w in app.warning), [w.value for w in app.warning]
    app.slider(key="tune_min").set_value(0.66).run()  # target below min: unreachable
    assert any("cannot be reached" in w.value for w in app.warning)
    assert not app.exception


def test_a_preset_sets_the_sliders_and_the_rest_of_the_run(app):
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    chosen = next(name for name in PRESETS if name != app_support.START_PRESET)  # original
    preset = PRESETS[chosen]
    use_preset(app, chosen)
    assert app.session_state["preset"] == chosen
    assert app.slider(key="tune_alpha").value == pytest.approx(preset.alpha)
    assert app.toggle(key="tune_attention").value == preset.prune_attention
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    config = app.session_state["runs"][-1].config
    assert config.mode == preset.mode and config.alpha == pytest.approx(preset.alpha)
    assert config.to_dict() == preset.with_(**{
        k: getattr(config, k) for k in ("base_model", "device", "dtype", "unit_importance",
                                        "num_examples", "seq_len", "eval_datasets",
                                        "eval_seq_len", "max_eval_windows", "importance_method",
                                        "importance_samples", "importance_seq_len",
                                        "recovery_steps", "recovery_time_s", "recovery_seq_len",
                                        "recovery_samples")}).to_dict()


def test_pruning_run_completes_shows_counts_and_exports(app, tmp_path):
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    app.toggle(key="tune_attention").set_value(True).run()  # groups as well as channels
    app.slider(key="tune_ratio").set_value(0.45).run()
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    runs = app.session_state["runs"]
    assert len(runs) == 1 and runs[0].config.pruning_ratio == pytest.approx(0.45)
    assert runs[0].config.prune_attention and runs[0].config.compensate  # the default preset
    split, report = runs[0].split, runs[0].report
    assert split.total == report["params_before"] - report["params_after"]
    assert split.attention_total > 0 and split.mlp_total > 0
    counts = next(d.value for d in app.dataframe if "KV heads after" in d.value.columns)
    assert list(counts["layer"]) == [0, 1, 2]
    assert (counts["KV heads after"] <= counts["KV heads before"]).all()
    assert counts["Q heads after"].sum() < counts["Q heads before"].sum()
    assert any("perplexity demo" == m.label for m in app.metric)
    click(app, "Prune a copy of the model")  # a second run, compared side by side
    comparison = next(d.value for d in app.dataframe if "strategy" in d.value.columns)
    assert list(comparison["run"]) == [1, 2]
    shares = comparison["attn share of removed %"] + comparison["MLP share of removed %"]
    assert list(shares) == pytest.approx([100, 100], abs=0.11)

    open_page(app, "6_export")
    assert runs[1].split.summary() in texts(app)
    assert split_bars(app)["attention (GQA groups)"] == list(runs[1].split.attention)
    app.text_input(key="export_name_2").input("from-test").run()
    click(app, "Save")
    saved = tmp_path / "prune_log" / "from-test"
    assert (saved / "model" / "gqaprune_plan.json").is_file()
    assert (saved / "model" / "gqaprune_manifest.json").is_file()
    card = (saved / "model" / "README.md").read_text()  # the model card, with the perplexity
    assert "| demo |" in card and "| pruning_ratio | `0.45` |" in card
    assert json.loads((saved / "report.json").read_text())["layers"]
    assert any("load_pruned" in c.value for c in app.code)


def test_a_run_with_recovery_shows_perplexity_after_pruning_and_after_recovery(app):
    open_page(app, "5_prune")
    app.selectbox(key="run_recovery").set_value("lora")
    app.number_input(key="run_recovery_steps").set_value(2)
    click(app, "Prune a copy of the model")
    run = app.session_state["runs"][0]
    assert run.config.recovery == "lora" and run.report["recovery"]["steps_done"] == 2
    table = next(d.value for d in app.dataframe if "after recovery" in d.value.columns)
    assert list(table.columns[:4]) == ["corpus", "before pruning", "after pruning",
                                       "after recovery"]
    assert table["after recovery"].iloc[0] == run.report["ppl_after"]["demo"]["value"]
    assert "Recovery cost: LoRA: 2 of 2 steps" in texts(app)
    assert "No predicted perplexity for this run" in texts(app)  # no profile computed


def test_a_run_with_the_quality_gate_shows_its_ratio_to_perplexity_curve(app):
    open_page(app, "5_prune")
    app.checkbox(key="run_gate").check()
    app.number_input(key="run_gate_increase").set_value(1000.0)  # every ratio passes
    click(app, "Prune a copy of the model")
    run = app.session_state["runs"][0]
    gate = run.report["gate"]
    assert run.config.max_ppl_increase == pytest.approx(10.0)
    assert gate["limit"] == pytest.approx(11.0) and gate["validation"].endswith(":fit")
    assert gate["ratio"] == pytest.approx(run.config.pruning_ratio)  # within the gate at once
    assert run.report["config"]["pruning_ratio"] == pytest.approx(gate["ratio"])
    curve = next(d.value for d in app.dataframe if "within the gate" in d.value.columns)
    measured = curve.dropna(subset=["measured x dense"])
    assert len(measured) == 1 and list(measured["within the gate"]) == ["yes"]
    assert measured["measured x dense"].iloc[0] == pytest.approx(gate["curve"][-1]["measured"])
    assert f"Pruned at {gate['ratio']:.1%}" in "\n".join(s.value for s in app.success)
    compared = next(d.value for d in app.dataframe if "quality gate" in d.value.columns)
    assert list(compared["quality gate"]) == ["ppl ≤ x11"]
    assert any(spec["layout"]["yaxis"]["title"]["text"].startswith("perplexity x dense")
               for spec in chart_specs(app) if spec["layout"].get("yaxis", {}).get("title"))


def test_a_failing_job_is_a_readable_error_until_the_next_run(app, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in layer 7")

    monkeypatch.setattr(app_support, "prune_job", broken)
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    assert any("out of memory in layer 7" in e.value for e in app.error)
    app.run()  # still shown after an unrelated rerun
    assert any("out of memory in layer 7" in e.value for e in app.error)
    assert not app.session_state["runs"]


def test_job_registry_runs_work_in_the_background_and_reports_failures():
    registry = JobRegistry(synchronous=False)

    def work(job):
        job.progress("step", 1, 2)
        return 42

    job = registry.submit("me", "sum", work)
    deadline = time.monotonic() + 10
    while job.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == "done" and job.result == 42 and registry.pop("me", "sum") is job
    failed = registry.submit("me", "bad", lambda job: 1 / 0)
    while failed.running:
        time.sleep(0.01)
    assert failed.status == "error" and "ZeroDivisionError" in failed.error


def test_budget_split_counts_the_parameters_each_part_gives(make_tiny):
    import copy

    import torch

    from gqaprune_core.plan import build_plan
    from gqaprune_core.schedule import allocate_units, unit_costs
    from gqaprune_core.surgery import apply_plan_

    model = make_tiny("qwen2_bias")  # biases count with their units
    shapes, costs = layout(model), unit_costs(model)
    allocation = allocate_units(shapes, costs, [0.5, 0.2, 0.6], prune_attention=True,
                                prune_mlp=True, group_rounding="per_layer")
    split = app_rates.allocation_split(shapes, costs, allocation)
    assert split.total == allocation.params_removed
    assert split.groups_removed == tuple(s.kv_heads - g for s, g in
                                         zip(shapes, allocation.groups_to_keep))
    assert split.attention == tuple(g * c.group for g, c in zip(split.groups_removed, costs))
    assert split.attention_total > 0 and split.mlp_total > 0
    assert split.attention_share + split.mlp_share == pytest.approx(1.0)
    assert f"{split.attention_share:.1%}" in split.summary()
    assert list(split.table()["MLP params removed"]) == list(split.mlp)
    # the plan made from that allocation removes exactly the split's parameters
    plan = build_plan(shapes, [torch.arange(s.kv_heads, dtype=torch.float) for s in shapes],
                      [torch.arange(s.mlp_width, dtype=torch.float) for s in shapes],
                      allocation.groups_to_keep, allocation.channels_to_keep)
    pruned = apply_plan_(copy.deepcopy(model), plan)
    from_plan = app_rates.plan_split(plan, costs)
    assert from_plan == split
    assert from_plan.total == count_parameters(model) - count_parameters(pruned)
    assert app_rates.plan_split(plan, unit_costs(pruned)) == split  # unit costs survive cuts
    mlp_only = allocate_units(shapes, costs, [0.3] * 3, prune_attention=False)
    none_from_attention = app_rates.allocation_split(shapes, costs, mlp_only)
    assert none_from_attention.attention_total == 0 and none_from_attention.mlp_share == 1.0
    nothing = app_rates.budget_split(costs, [0, 0, 0], [0, 0, 0])
    assert nothing.attention_share == nothing.mlp_share == 0.0
    with pytest.raises(ValueError, match="one cost and two counts per layer"):
        app_rates.budget_split(costs, [0, 0], [0, 0, 0])


def test_head_mapping_keeps_groups_intact_and_flags_naive_cuts():
    group_cut = head_mapping(6, 2, [3, 4, 5], [1])
    assert group_cut["intact"].all()
    naive = head_mapping(6, 2, [1, 3, 5], [1])  # q1 was trained with k0 but now reads k1
    assert list(naive["intact"]) == [False, True, True]


def test_importing_the_library_never_imports_streamlit():
    import subprocess
    import sys

    code = ("import sys, gqaprune_core, gqaprune_core.app_support, gqaprune_core.app_rates, "
            "gqaprune_core.app_layerwise, gqaprune_core.app_export; "
            "sys.exit('streamlit' in sys.modules or 'plotly' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(APP).parent).returncode == 0


def test_export_page_offers_gguf_and_shows_a_refusal_as_a_message(app, tmp_path):
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    open_page(app, "6_export")
    app.selectbox(key="gguf_type_1").set_value("f16").run()
    click(app, "Export GGUF")  # the tiny model's character tokenizer has no GGUF form
    assert any("Could not export GGUF" in e.value and "WordLevel" in e.value for e in app.error)
    assert not list((tmp_path / "prune_log").rglob("*.gguf"))


# ---- sensitivity profile, predicted perplexity, optimized strategy (issue 16) ----------------

def predicted_metric(at: AppTest) -> str:
    found = [m for m in at.metric if m.label == "predicted perplexity"]
    assert found, [m.label for m in at.metric]
    return found[0].value


def test_rate_tuning_predicts_perplexity_live_and_runs_the_optimized_strategy(app):
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    assert predicted_metric(app) == "—"
    click(app, "Compute sensitivity profile")
    first = predicted_metric(app)
    assert first.startswith("x")
    app.session_state["prediction_ms"] = None
    app.slider(key="tune_ratio").set_value(0.25).run()  # more removed: no better predicted
    assert float(predicted_metric(app)[1:]) >= float(first[1:])
    assert app.session_state["prediction_ms"] is not None  # recomputed on the move (its speed:
    # benchmarks/sensitivity.py, not a timed test)
    app.segmented_control(key="tune_strategy").set_value("optimized").run()
    assert not app.exception and not app.warning, [w.value for w in app.warning]
    assert len(rate_bars(app)) == 3
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    run = app.session_state["runs"][-1]
    assert run.config.pruning_strategy == "optimized" and run.report["predicted"]["ratio"] >= 1
    assert any("Predicted next to measured" in m.value for m in app.markdown)


def test_profile_heatmap_and_group_costs_are_shown_once_computed(app):
    open_page(app, "3_layer_importance")
    click(app, "Compute layer importance")
    click(app, "Compute sensitivity profile")
    assert any(t["type"] == "heatmap" for spec in chart_specs(app) for t in spec["data"])
    open_page(app, "2_gqa_structure")
    names = {t.get("name") for spec in chart_specs(app) for t in spec["data"]}
    assert "1 group removed" in names
