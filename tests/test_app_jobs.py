"""The app with real background jobs (threads), as a browser user meets them: two sessions
pruning at the same time, a slider moved while a job runs, a second job started while one
runs. Nothing may be lost or mixed: every result must be the one its own settings give when
run alone.

Unlike tests/test_app.py, jobs run in worker threads here. A gate (a wrapper around
``app_support.prune_job``) holds every prune job until the test opens it, so the jobs do
overlap, whatever the machine's speed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from gqaprune_core import app_export, app_support, jobs
from gqaprune_core.config import PRESETS
from gqaprune_core.models import count_parameters, load_model

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PRUNE = "Prune a copy of the model"
TIMEOUT = 240.0
TINY_KEY = ("tiny", "auto", "auto")  # the session's model choice


class Gate:
    """Holds prune jobs at their start until :meth:`open`; counts the jobs that reached it."""

    def __init__(self, original) -> None:
        self.original, self.opened = original, threading.Event()
        self.waiting = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.waiting += 1
        if not self.opened.wait(TIMEOUT):
            raise TimeoutError("the test never opened the gate")
        return self.original(*args, **kwargs)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate(monkeypatch, tmp_path) -> Gate:
    monkeypatch.setenv("GQAPRUNE_APP_MODEL", "tiny")
    monkeypatch.setenv("GQAPRUNE_APP_QUICK", "1")
    monkeypatch.setenv("GQAPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "JOBS", jobs.JobRegistry(synchronous=False))
    held = Gate(app_support.prune_job)
    monkeypatch.setattr(app_support, "prune_job", held)
    yield held
    held.open()  # never leave a worker waiting


def session() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    return at


def page(at: AppTest, name: str) -> AppTest:
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, label: str) -> AppTest:
    button = next(b for b in at.button if b.label == label)
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_until(condition, at_list: list[AppTest], what: str) -> None:
    """Rerun the sessions (as the page's polling does) until ``condition()`` holds."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
        for at in at_list:
            at.run()
            assert not at.exception, [e.value for e in at.exception]


def wait_for_jobs(gate: Gate, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while gate.waiting < count:
        assert time.monotonic() < deadline, f"only {gate.waiting} of {count} jobs started"
        time.sleep(0.05)


def alone(run: app_support.PruneRun, importance=None) -> dict:
    """The report that ``run``'s settings (and the session's layer scores it was given) give
    in a job of their own, with nothing else running (shapes, parameter counts, perplexity;
    timings differ, of course)."""
    model, tokenizer = load_model("tiny", device="cpu")
    solo = app_support.prune_job.original(run.config, model, tokenizer, importance, run.prompt,
                                          0, lambda *a: None)
    return comparable(solo.report)


def comparable(report: dict) -> dict:
    return {key: report[key] for key in ("params_after", "layers", "config", "ppl_after")}


def test_two_sessions_pruning_at_once_each_get_their_own_result(gate):
    first, second = session(), session()
    for at, unit, windows in ((first, "magnitude", 2), (second, "random", 3)):
        page(at, "5_prune")
        assert at.selectbox(key="run_channels").value == "energy+fisher"  # the default's
        at.selectbox(key="run_unit").set_value(unit)
        at.number_input(key="run_windows").set_value(windows)
        if at is first:
            at.selectbox(key="run_channels").set_value("energy")
        click(at, PRUNE)
    wait_for_jobs(gate, 2)  # both jobs are running now, side by side
    gate.open()
    wait_until(lambda: all(at.session_state["runs"] for at in (first, second)),
               [first, second], "both runs")
    (run_a,), (run_b,) = first.session_state["runs"], second.session_state["runs"]
    assert run_a.config.channel_selection == "energy" and run_b.config.channel_selection == (
        "energy+fisher")
    assert (run_a.config.unit_importance, run_a.config.max_eval_windows) == ("magnitude", 2)
    assert (run_b.config.unit_importance, run_b.config.max_eval_windows) == ("random", 3)
    assert comparable(run_a.report) == alone(run_a)
    assert comparable(run_b.report) == alone(run_b)
    assert count_parameters(run_a.model) == run_a.report["params_after"]


def test_a_slider_moved_while_a_job_runs_changes_the_next_run_only(gate):
    at = session()
    page(at, "4_rate_tuning")
    click(at, "Compute layer importance")
    wait_until(lambda: "importance" in at.session_state and at.session_state["importance"],
               [at], "layer importance")
    at.slider(key="tune_ratio").set_value(0.25).run()  # of all: 65.6 % of the tiny MLPs
    assert not at.warning, [w.value for w in at.warning]
    page(at, "5_prune")
    click(at, PRUNE)
    wait_for_jobs(gate, 1)
    page(at, "4_rate_tuning")
    at.slider(key="tune_ratio").set_value(0.1).run()  # while the job runs
    assert not at.warning, [w.value for w in at.warning]
    page(at, "5_prune")
    gate.open()
    wait_until(lambda: at.session_state["runs"], [at], "the first run")
    (run,) = at.session_state["runs"]
    assert run.config.pruning_ratio == pytest.approx(0.25)
    assert comparable(run.report) == alone(run, at.session_state["importance"][TINY_KEY])
    assert at.session_state["tuning"][TINY_KEY]["pruning_ratio"] == \
        pytest.approx(0.1)
    click(at, PRUNE)  # the next run takes the moved slider
    wait_until(lambda: len(at.session_state["runs"]) == 2, [at], "the second run")
    assert at.session_state["runs"][1].config.pruning_ratio == pytest.approx(0.1)


def test_a_second_job_while_one_runs_is_refused_and_the_first_survives(gate):
    at = session()
    page(at, "5_prune")
    at.selectbox(key="run_unit").set_value("magnitude")
    click(at, PRUNE)
    wait_for_jobs(gate, 1)
    assert next(b for b in at.button if b.label == PRUNE).disabled  # drawn disabled at once
    submitted = jobs.JOBS.get(at.session_state["_owner"], "prune")
    with pytest.raises(RuntimeError, match="already running"):  # the guard behind the button
        jobs.JOBS.submit(at.session_state["_owner"], "prune", lambda job: None)
    assert jobs.JOBS.get(at.session_state["_owner"], "prune") is submitted
    gate.open()
    wait_until(lambda: at.session_state["runs"], [at], "the run")
    (run,) = at.session_state["runs"]
    assert run.config.unit_importance == "magnitude"
    assert comparable(run.report) == alone(run)


def test_saving_under_a_name_another_save_holds_is_refused(tmp_path):
    from gqaprune_core import runlock

    model, tokenizer = load_model("tiny", device="cpu")
    run = app_support.prune_job(PRESETS["original"].with_(base_model="tiny", device="cpu",
                                                          num_examples=2, eval_datasets=()),
                                model, tokenizer, None, "", 0, lambda *a: None)
    with runlock.lock_run_dir(tmp_path / "shared"):
        with pytest.raises(ValueError, match="in use by another gqaprune run"):
            app_export.save_run(run, "shared", tmp_path)
    assert list((tmp_path / "shared").iterdir()) == []
    assert (app_export.save_run(run, "shared", tmp_path) / "model").is_dir()
