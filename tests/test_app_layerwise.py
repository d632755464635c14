"""The clean-up of the app's layer-wise run folders (gqaprune_core.app_layerwise).

Run folders are faked in ``tmp_path`` (``run-STAMP/model/``, names in start order); "in use" is
a lock held the way a job or a live run holds it, in this process or in another one. The job
itself runs with a stand-in for ``run_layerwise``, so nothing is pruned and no model is read.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from gqaprune_core import app_layerwise, app_support, runlock
from gqaprune_core.config import PRESETS
from gqaprune_core.export.staging import OWNER_NAME, owner_record


def fake_runs(root: Path, count: int) -> list[Path]:
    """``count`` finished run folders, oldest first."""
    folders = []
    for i in range(count):
        folder = root / f"run-20240101-0000{i:02d}-000000"
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"weights")
        folders.append(folder)
    return folders


def names(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_old_runs_beyond_the_limit_go_and_the_newest_stay(tmp_path):
    folders = fake_runs(tmp_path, 5)
    removed = app_layerwise.remove_old_runs(tmp_path, keep=2)
    assert removed == folders[:3]
    assert names(tmp_path) == [f.name for f in folders[3:]]
    assert app_layerwise.remove_old_runs(tmp_path, keep=2) == []  # nothing more to do
    with pytest.raises(ValueError, match="keep must be >= 1"):
        app_layerwise.remove_old_runs(tmp_path, keep=0)


def test_a_run_folder_in_use_stays_whatever_its_age(tmp_path):
    oldest, in_use, *_ = folders = fake_runs(tmp_path, 5)
    with runlock.lock_run_dir(in_use):  # a job writing it, or a live run pointing at it
        assert app_layerwise.remove_old_runs(tmp_path, keep=1) == [oldest, *folders[2:4]]
        assert names(tmp_path) == [in_use.name, folders[4].name]
        assert (in_use / "model" / "model.safetensors").exists()
    assert app_layerwise.remove_old_runs(tmp_path, keep=1) == [in_use]  # let go: it goes


def test_a_run_folder_another_process_holds_stays(tmp_path):
    folders = fake_runs(tmp_path, 3)
    code = ("import sys; from gqaprune_core.runlock import lock_run_dir; "
            f"lock = lock_run_dir({str(folders[0])!r}); print('locked', flush=True); "
            "sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert app_layerwise.remove_old_runs(tmp_path, keep=1) == [folders[1]]
        assert folders[0].is_dir()
    finally:
        holder.communicate("", timeout=30)  # ends the holder: the kernel drops its lock
    assert app_layerwise.remove_old_runs(tmp_path, keep=1) == [folders[0]]


def test_a_folder_that_cannot_be_removed_is_logged_and_skipped(tmp_path, monkeypatch, caplog):
    folders = fake_runs(tmp_path, 4)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == folders[1]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(app_layerwise.shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger=app_layerwise.__name__):
        assert app_layerwise.remove_old_runs(tmp_path, keep=1) == [folders[0], folders[2]]
    assert "could not remove old app run" in caplog.text and str(folders[1]) in caplog.text
    assert names(tmp_path) == [folders[1].name, folders[3].name]
    runlock.check_not_busy(folders[1])  # the clean-up's own lock was given back


def test_staging_left_by_a_killed_job_goes_and_a_live_one_stays(tmp_path):
    dead = tmp_path / ".run-20240101-000000-000000.saving-0badc0de"
    live = tmp_path / ".run-20240101-000001-000000.saving-0123abcd"
    for staging, owner in ((dead, {"pid": 2**30, "host": socket.gethostname(), "start": "1"}),
                           (live, owner_record())):
        staging.mkdir()
        (staging / OWNER_NAME).write_text(json.dumps(owner))
    app_layerwise.remove_old_runs(tmp_path)
    assert names(tmp_path) == [live.name]


@pytest.fixture
def job(make_tiny, tmp_path, monkeypatch):
    """``job(fail=False)`` runs ``layerwise_job`` into ``tmp_path / "app_runs"``; the stand-in
    for ``run_layerwise`` records the run folders it found and writes a one-file checkpoint."""
    from gqaprune_core.layerwise import pipeline

    root = tmp_path / "app_runs"
    seen: list[list[str]] = []
    failing = []

    def run_layerwise(config, output, **kwargs):
        seen.append(names(root))
        if failing:
            raise RuntimeError("out of disk in layer 3")
        output.mkdir()
        (output / "model.safetensors").write_bytes(b"pruned")
        return SimpleNamespace(report={}, plan=None)

    monkeypatch.setattr(app_layerwise, "app_runs_dir", lambda: root)
    monkeypatch.setattr(pipeline, "run_layerwise", run_layerwise)
    monkeypatch.setattr(app_layerwise, "plan_split", lambda plan, costs: None)
    model = make_tiny()

    def start(fail: bool = False) -> app_support.PruneRun:
        failing[:] = [True] if fail else []
        return app_layerwise.layerwise_job(PRESETS["default"], model, None, None, "", 0,
                                           lambda *a: None)

    start.root, start.seen = root, seen
    return start


def test_a_new_job_keeps_the_newest_runs_counting_itself_and_its_own_stays_locked(job):
    old = fake_runs(job.root, 3)
    run = job()
    folder = run.checkpoint.parent
    assert run.checkpoint == folder / "model" and (run.checkpoint / "model.safetensors").exists()
    # cleaned before it wrote: the new folder and the newest old one (KEEP_APP_RUNS = 2)
    assert app_layerwise.KEEP_APP_RUNS == 2
    assert job.seen == [[old[2].name, folder.name]]
    with pytest.raises(runlock.RunBusyError):
        runlock.check_not_busy(folder)  # held while the run lives (a session may save it)
    for _ in range(2):
        job()
    assert folder.is_dir()  # older than the two newest, but its run is still alive
    del run
    gc.collect()
    runlock.check_not_busy(folder)  # the run is gone: so is its lock
    job()
    assert not folder.exists()


def test_a_failed_job_leaves_no_folder_and_still_cleans_up(job):
    fake_runs(job.root, 3)
    with pytest.raises(RuntimeError, match="out of disk"):
        job(fail=True)
    assert len(job.seen[0]) == 2  # the clean-up ran; the job's own folder was one of the two
    assert names(job.root) == [job.seen[0][0]]  # its own folder is gone, lock and all
