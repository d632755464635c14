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

from gqaprune_core import app_support
from gqaprune_core.app_support import JobRegistry, head_mapping

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
    monkeypatch.setattr(app_support.JOBS, "synchronous", True)
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


def test_rate_tuning_redraws_on_slider_moves_and_warns_on_impossible_settings(app):
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    before = rate_bars(app)
    assert len(before) == 3
    app.slider(key="tune_ratio").set_value(0.35).run()
    after = rate_bars(app)
    assert after != before and sum(after) > sum(before)
    tuned = app.session_state["tuning"][("tiny", "auto", "auto")]
    assert tuned["pruning_ratio"] == pytest.approx(0.35)
    app.slider(key="tune_min").set_value(0.6).run()  # min above max
    assert any("min" in w.value for w in app.warning), [w.value for w in app.warning]
    app.slider(key="tune_min").set_value(0.4).run()  # target below min: unreachable
    assert any("cannot be reached" in w.value for w in app.warning)
    assert not app.exception


def test_a_preset_sets_the_sliders_and_the_rest_of_the_run(app):
    from gqaprune_core.config import PRESETS

    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    chosen = next(name for name in PRESETS if name != "original")
    preset = PRESETS[chosen]
    app.selectbox(key="tune_preset_choice").set_value(chosen).run()
    click(app, "Apply preset")
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
                                        "importance_samples", "importance_seq_len")}).to_dict()


def test_pruning_run_completes_shows_counts_and_exports(app, tmp_path):
    open_page(app, "4_rate_tuning")
    click(app, "Compute layer importance")
    app.slider(key="tune_ratio").set_value(0.3).run()
    open_page(app, "5_prune")
    click(app, "Prune a copy of the model")
    runs = app.session_state["runs"]
    assert len(runs) == 1 and runs[0].config.pruning_ratio == pytest.approx(0.3)
    counts = next(d.value for d in app.dataframe if "KV heads after" in d.value.columns)
    assert list(counts["layer"]) == [0, 1, 2]
    assert (counts["KV heads after"] <= counts["KV heads before"]).all()
    assert counts["Q heads after"].sum() < counts["Q heads before"].sum()
    assert any("perplexity demo" == m.label for m in app.metric)
    click(app, "Prune a copy of the model")  # a second run, compared side by side
    comparison = next(d.value for d in app.dataframe if "strategy" in d.value.columns)
    assert list(comparison["run"]) == [1, 2]

    open_page(app, "6_export")
    app.text_input(key="export_name_2").input("from-test").run()
    click(app, "Save")
    saved = tmp_path / "prune_log" / "from-test"
    assert (saved / "model" / "gqaprune_plan.json").is_file()
    assert json.loads((saved / "report.json").read_text())["layers"]
    assert any("load_pruned" in c.value for c in app.code)


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


def test_head_mapping_keeps_groups_intact_and_flags_naive_cuts():
    group_cut = head_mapping(6, 2, [3, 4, 5], [1])
    assert group_cut["intact"].all()
    naive = head_mapping(6, 2, [1, 3, 5], [1])  # q1 was trained with k0 but now reads k1
    assert list(naive["intact"]) == [False, True, True]


def test_importing_the_library_never_imports_streamlit():
    import subprocess
    import sys

    code = ("import sys, gqaprune_core, gqaprune_core.app_support; "
            "sys.exit('streamlit' in sys.modules or 'plotly' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(APP).parent).returncode == 0
